import { createHash, randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { gzipSync } from 'node:zlib';
import {
  BlobSASPermissions,
  BlobServiceClient,
  type ContainerClient,
  generateBlobSASQueryParameters,
  StorageSharedKeyCredential,
} from '@azure/storage-blob';
import {
  DEFENDER_PERMISSIONS,
  DELTA_EXPORT,
  EXPORT_TYPES,
  type ExportId,
  type ExportType,
  getExportType,
  JSON_CALLS_PER_HOUR,
  JSON_CALLS_PER_MINUTE,
  VIA_FILES_CALLS_PER_HOUR,
  VIA_FILES_CALLS_PER_MINUTE,
} from '../core/catalog.js';
import { runBounded } from '../core/concurrency.js';
import { type DeltaSlice, PagedEndpoints, type PageFault, timePathOf } from './pagedEndpoints.js';
import { generateRecords, seededRng } from './records.js';

/**
 * A stand-in for the Defender "export assessment via files" API, following its documented contract:
 * App-Service-style managed identity token endpoint, bearer check with app-role permissions, the nine
 * via-files endpoints (case-insensitive paths, `sasValidHours` bounds), 5 calls/min and 20 calls/h per
 * endpoint with 429 + Retry-After, the documented error body, and SAS URLs to gzip JSON-lines part files
 * held in an Azurite account that plays Microsoft's export storage. Faults can be switched on per export.
 * The paged JSON endpoints (`…ByMachine`) and the delta are in pagedEndpoints.ts, behind the same token check.
 */
export interface SourceAccount {
  readonly name: string;
  readonly key: string;
  readonly blobEndpoint: string;
}

export interface SimulatedPart {
  readonly relativePath: string;
  readonly blobName: string;
  readonly bytes: number;
  readonly md5: string;
  readonly records: number;
  /** How its lines were generated: the JSON endpoints page through the same records. */
  readonly generator: { readonly seed: string; readonly rbacGroupId: number };
}

export interface SimulatedSnapshot {
  readonly exportId: ExportId;
  readonly generatedTime: string;
  readonly container: string;
  readonly prefix: string;
  readonly parts: readonly SimulatedPart[];
}

export interface PublishOptions {
  /** ISO time, whole minute; default: the current minute. */
  generatedTime?: string;
  /** RBAC group ids; the same part file names repeat in every group. */
  groups?: readonly number[];
  /** Spark tasks per group; task 1 is split into c000 and c001. */
  partsPerGroup?: number;
  recordsPerPart?: number;
  /** One extra part in the first group with this many records (to exercise large-part copy paths). */
  largePartRecords?: number;
  /** Add a part with no records (Spark writes those). */
  emptyPart?: boolean;
  /**
   * Exactly these records instead of generated ones (hand-built snapshots): one part per RBAC group they name
   * (`rbacGroupId` in either casing, else group 0), as Defender partitions its files.
   */
  records?: readonly Record<string, unknown>[];
}

export type Fault =
  | { kind: 'status'; status: number; code?: string; retryAfterSeconds?: number }
  | { kind: 'malformed' }
  /** SAS URLs that have already expired, for the first `parts` parts (default all). */
  | { kind: 'expired-sas'; parts?: number }
  /** One extra URL pointing at a part blob that does not exist. */
  | { kind: 'missing-blob' }
  /** Answer normally, after `ms` of silence (a stalled API). */
  | { kind: 'stall'; ms: number }
  /**
   * Hostile or broken responses: the body as the simulator would send it, changed by `rewrite` (an empty or
   * partial list, a time in the future, URLs of another export). `signUrl` signs any blob name of the snapshot.
   */
  | {
      kind: 'rewrite';
      rewrite: (
        body: { exportFiles: string[]; generatedTime: string },
        signUrl: (blobName: string) => string,
      ) => { exportFiles: string[]; generatedTime: string };
    };

export interface SimulatorOptions {
  source: SourceAccount;
  /** App roles granted to the identity (default: all three the exports need). */
  roles?: readonly string[];
  /** Enforce the documented call budget (default true). */
  enforceRateLimits?: boolean;
  /** Seed for deterministic data (default "mdvm"). */
  seed?: string;
}

export interface SimulatorRequest {
  readonly method: string;
  readonly path: string;
  readonly status: number;
}

const ALL_ROLES = DEFENDER_PERMISSIONS;
const ACCEPTED_RESOURCES = new Set(['https://api.securitycenter.microsoft.com', 'https://api.security.microsoft.com']);
const ORG_ID = '5f0c1e2a-7b3d-4c8e-9a61-2d4b8e7f9c03';

export class DefenderSimulator {
  readonly identityHeader = randomUUID();
  readonly requests: SimulatorRequest[] = [];
  /** Every SAS signature and bearer token handed out: what must never appear in the app's output. */
  readonly issuedSecrets = new Set<string>();
  private roles: Set<string>;
  private readonly snapshots = new Map<ExportId, SimulatedSnapshot>();
  private readonly faults = new Map<ExportId, Fault[]>();
  private readonly history = new Map<string, SimulatedSnapshot>();
  private readonly tokens = new Map<string, number>();
  private readonly calls = new Map<string, number[]>();
  private readonly blobService: BlobServiceClient;
  private readonly sharedKey: StorageSharedKeyCredential;
  private readonly paged: PagedEndpoints;

  private constructor(
    private readonly server: Server,
    private readonly options: SimulatorOptions,
    readonly baseUrl: string,
  ) {
    this.roles = new Set(options.roles ?? ALL_ROLES);
    this.sharedKey = new StorageSharedKeyCredential(options.source.name, options.source.key);
    this.blobService = new BlobServiceClient(options.source.blobEndpoint, this.sharedKey);
    this.paged = new PagedEndpoints(baseUrl, options.seed ?? 'mdvm', (exportId, timePath) =>
      timePath === undefined
        ? this.snapshots.get(exportId)
        : [...this.history.values()].find((s) => s.exportId === exportId && timePathOf(s.generatedTime) === timePath),
    );
  }

  /** Publish one 6-hour slice of the software-vulnerability delta. */
  publishDeltaSlice(slice: DeltaSlice): void {
    this.paged.publishDeltaSlice(slice);
  }

  /** Every record of a published delta slice, as the delta endpoint serves it (the tests' source of truth). */
  deltaRecordsOf(slice: DeltaSlice): string[] {
    return this.paged.deltaLines(slice);
  }

  /**
   * A fault on a paged JSON endpoint: `target` is an export id (its `…ByMachine`) or the delta's id; it hits after
   * `afterPages` more pages were served normally, `times` times.
   */
  injectPageFault(
    target: ExportId | typeof DELTA_EXPORT.id,
    fault: PageFault,
    options: { afterPages?: number; times?: number } = {},
  ): void {
    this.paged.injectFault(target, fault, options);
  }

  static async start(options: SimulatorOptions): Promise<DefenderSimulator> {
    let simulator: DefenderSimulator | undefined;
    const server = createServer((req, res) => {
      simulator?.handle(req, res).catch((error: unknown) => {
        res.statusCode = 500;
        res.end(JSON.stringify({ error: { code: 'InternalServerError', message: String(error) } }));
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const address = server.address();
    const port = typeof address === 'object' && address ? address.port : 0;
    simulator = new DefenderSimulator(server, options, `http://127.0.0.1:${port}`);
    return simulator;
  }

  /** What the Functions platform sets for a managed identity: point the app's credential here. */
  get identityEnvironment(): { IDENTITY_ENDPOINT: string; IDENTITY_HEADER: string } {
    return { IDENTITY_ENDPOINT: `${this.baseUrl}/msi/token`, IDENTITY_HEADER: this.identityHeader };
  }

  /** Forget past calls (a new hour, as far as the call budget is concerned). */
  resetRateLimits(): void {
    this.calls.clear();
  }

  setRoles(roles: readonly string[]): void {
    this.roles = new Set(roles);
  }

  injectFault(exportId: ExportId, fault: Fault, times = 1): void {
    const list = this.faults.get(exportId) ?? [];
    for (let i = 0; i < times; i++) list.push(fault);
    this.faults.set(exportId, list);
  }

  snapshotOf(exportId: ExportId): SimulatedSnapshot | undefined {
    return this.snapshots.get(exportId);
  }

  /** Every snapshot published for an export and generatedTime (the fault suite's source of truth). */
  published(exportId: ExportId, generatedTime: string): SimulatedSnapshot | undefined {
    return this.history.get(`${exportId}/${generatedTime}`);
  }

  sourceContainer(snapshot: SimulatedSnapshot): ContainerClient {
    return this.blobService.getContainerClient(snapshot.container);
  }

  /** Generate a snapshot's part files into the source account and make it the current one. */
  async publish(exportId: ExportId, options: PublishOptions = {}): Promise<SimulatedSnapshot> {
    const type = getExportType(exportId);
    const generated = options.generatedTime ? new Date(options.generatedTime) : new Date();
    generated.setUTCSeconds(0, 0);
    const generatedTime = generated.toISOString().replace('.000Z', 'Z');
    const seed = `${this.options.seed ?? 'mdvm'}/${exportId}/${generatedTime}`;
    const rng = seededRng(seed);
    const job = uuidFrom(rng);
    const container = `temp-${uuidFrom(rng)}`;
    const iso = generatedTime;
    const prefix = `${iso.slice(0, 10)}/${iso.slice(11, 13)}${iso.slice(14, 16)}/${type.blobExportName}/json`;
    const groups = options.groups ?? [0, 12, 31];
    const partsPerGroup = options.partsPerGroup ?? 2;
    const recordsPerPart = options.recordsPerPart ?? 200;

    const files: { relativePath: string; records: number; rbacGroupId: number; lines?: string }[] = [];
    const given = new Map<number, Record<string, unknown>[]>();
    for (const record of options.records ?? []) {
      const group = Number(record.rbacGroupId ?? record.RbacGroupId ?? 0);
      given.set(group, [...(given.get(group) ?? []), record]);
    }
    for (const [group, records] of given) {
      files.push({
        relativePath: `OrgId=${ORG_ID}/_RbacGroupId=${group}/part-00000-${job}.c000.json.gz`,
        records: records.length,
        rbacGroupId: group,
        lines: records.map((r) => `${JSON.stringify(r)}\n`).join(''),
      });
    }
    for (const group of options.records ? [] : groups) {
      for (let task = 0; task < partsPerGroup; task++) {
        const splits = task === 1 ? 2 : 1;
        for (let split = 0; split < splits; split++) {
          files.push({
            relativePath: `OrgId=${ORG_ID}/_RbacGroupId=${group}/part-${String(task).padStart(5, '0')}-${job}.c${String(split).padStart(3, '0')}.json.gz`,
            records: recordsPerPart,
            rbacGroupId: group,
          });
        }
      }
    }
    const firstGroup = groups[0] ?? 0;
    if (options.largePartRecords) {
      files.push({
        relativePath: `OrgId=${ORG_ID}/_RbacGroupId=${firstGroup}/part-${String(partsPerGroup).padStart(5, '0')}-${job}.c000.json.gz`,
        records: options.largePartRecords,
        rbacGroupId: firstGroup,
      });
    }
    if (options.emptyPart) {
      files.push({
        relativePath: `OrgId=${ORG_ID}/_RbacGroupId=${firstGroup}/part-${String(partsPerGroup + 1).padStart(5, '0')}-${job}.c000.json.gz`,
        records: 0,
        rbacGroupId: firstGroup,
      });
    }

    const containerClient = this.blobService.getContainerClient(container);
    await containerClient.createIfNotExists();
    // Uploaded 16 at a time: a snapshot of thousands of parts (the benchmark's tick) is ready in seconds.
    const parts: SimulatedPart[] = await runBounded(files, 16, async (file) => {
      const body = gzipSync(
        file.lines ?? generateRecords(exportId, `${seed}/${file.relativePath}`, file.rbacGroupId, file.records),
      );
      const blobName = `${prefix}/${file.relativePath}`;
      await containerClient.getBlockBlobClient(blobName).uploadData(body, {
        blobHTTPHeaders: { blobContentType: 'application/octet-stream' },
      });
      return {
        relativePath: file.relativePath,
        blobName,
        bytes: body.length,
        md5: createHash('md5').update(body).digest('base64'),
        records: file.records,
        generator: { seed: `${seed}/${file.relativePath}`, rbacGroupId: file.rbacGroupId },
      };
    });
    const snapshot: SimulatedSnapshot = { exportId, generatedTime, container, prefix, parts };
    this.snapshots.set(exportId, snapshot);
    this.history.set(`${exportId}/${generatedTime}`, snapshot);
    return snapshot;
  }

  async publishAll(options: PublishOptions = {}): Promise<SimulatedSnapshot[]> {
    const out: SimulatedSnapshot[] = [];
    for (const type of EXPORT_TYPES) out.push(await this.publish(type.id, options));
    return out;
  }

  async stop(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.server.closeAllConnections();
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', this.baseUrl);
    const send = (status: number, body: unknown, headers: Record<string, string> = {}) => {
      this.requests.push({ method: req.method ?? 'GET', path: url.pathname, status });
      res.writeHead(status, { 'content-type': 'application/json', ...headers });
      res.end(typeof body === 'string' ? body : JSON.stringify(body));
    };
    const error = (status: number, code: string, message: string, headers: Record<string, string> = {}) =>
      send(status, { error: { code, message, target: randomUUID() } }, headers);

    if (url.pathname === '/msi/token') {
      if (req.headers['x-identity-header'] !== this.identityHeader) {
        return error(401, 'Unauthorized', 'missing or wrong X-IDENTITY-HEADER');
      }
      const resource = url.searchParams.get('resource') ?? '';
      if (!ACCEPTED_RESOURCES.has(resource.replace(/\/+$/, ''))) {
        return error(400, 'invalid_resource', `unknown resource ${resource}`);
      }
      const token = randomUUID() + randomUUID();
      const expiresOn = Math.floor(Date.now() / 1000) + 3600;
      this.tokens.set(token, expiresOn * 1000);
      this.issuedSecrets.add(token);
      return send(200, { access_token: token, expires_on: String(expiresOn), resource, token_type: 'Bearer' });
    }

    const path = url.pathname.toLowerCase();
    const type = EXPORT_TYPES.find((t) => t.apiPath.toLowerCase() === path);
    const jsonType = EXPORT_TYPES.find((t) => 'jsonPath' in t && t.jsonPath.toLowerCase() === path);
    const delta = path === DELTA_EXPORT.apiPath.toLowerCase();
    const permission = type?.permission ?? jsonType?.permission ?? (delta ? DELTA_EXPORT.permission : undefined);
    if (!permission || req.method !== 'GET')
      return error(404, 'ResourceNotFound', `no route for ${req.method} ${url.pathname}`);

    const auth = req.headers.authorization ?? '';
    const token = auth.startsWith('Bearer ') ? auth.slice(7) : '';
    const expiry = this.tokens.get(token);
    if (expiry === undefined || expiry < Date.now())
      return error(401, 'Unauthorized', 'missing, invalid or expired token');
    if (!this.roles.has(permission)) {
      return error(403, 'Forbidden', `the application lacks the ${permission} permission`);
    }

    if (this.options.enforceRateLimits !== false) {
      const wait = type
        ? this.rateLimitWaitInSeconds(type.id, VIA_FILES_CALLS_PER_MINUTE, VIA_FILES_CALLS_PER_HOUR)
        : this.rateLimitWaitInSeconds(`json:${path}`, JSON_CALLS_PER_MINUTE, JSON_CALLS_PER_HOUR);
      if (wait > 0) return error(429, 'TooManyRequests', 'API call quota exceeded', { 'retry-after': String(wait) });
    }
    // The paged JSON endpoints answer as they stream; the request is logged when the answer starts.
    if (jsonType || delta) {
      res.on('finish', () => this.requests.push({ method: 'GET', path: url.pathname, status: res.statusCode }));
      if (delta) return this.paged.serveDelta(url, res, error, Date.now());
      if (jsonType) return this.paged.serveSnapshot(jsonType, url, res, error);
    }
    if (!type) return error(404, 'ResourceNotFound', `no route for ${req.method} ${url.pathname}`);

    const hours = this.sasHours(type, url.searchParams.get('sasValidHours'));
    if (hours === undefined) {
      return error(400, 'InvalidInput', `sasValidHours must be a whole number from 1 to ${type.sasMaxHours}`);
    }

    const fault = this.faults.get(type.id)?.shift();
    if (fault?.kind === 'status') {
      return error(
        fault.status,
        fault.code ?? (fault.status === 429 ? 'TooManyRequests' : 'InternalServerError'),
        'injected fault',
        {
          ...(fault.retryAfterSeconds === undefined ? {} : { 'retry-after': String(fault.retryAfterSeconds) }),
        },
      );
    }
    if (fault?.kind === 'malformed') return send(200, '{"exportFiles": "not-a-list", ');
    if (fault?.kind === 'stall') await new Promise((resolve) => setTimeout(resolve, fault.ms));

    const snapshot = this.snapshots.get(type.id);
    if (!snapshot) return error(404, 'ResourceNotFound', 'no export has been generated yet');
    const now = Date.now();
    const expiredCount = fault?.kind === 'expired-sas' ? (fault.parts ?? snapshot.parts.length) : 0;
    const urls = snapshot.parts.map((part, i) =>
      this.sasUrl(
        snapshot,
        part.blobName,
        i < expiredCount ? new Date(now - 3_600_000) : new Date(now + hours * 3_600_000),
      ),
    );
    if (fault?.kind === 'missing-blob') {
      urls.push(
        this.sasUrl(
          snapshot,
          `${snapshot.prefix}/OrgId=${ORG_ID}/_RbacGroupId=99/part-00000-${randomUUID()}.c000.json.gz`,
          new Date(now + hours * 3_600_000),
        ),
      );
    }
    let body = { exportFiles: urls, generatedTime: snapshot.generatedTime };
    if (fault?.kind === 'rewrite') {
      body = fault.rewrite(body, (blobName) => this.sasUrl(snapshot, blobName, new Date(now + hours * 3_600_000)));
    }
    return send(200, {
      '@odata.context': `${this.baseUrl}/api/$metadata#microsoft.windowsDefenderATP.api.ExportFilesResponse`,
      ...body,
    });
  }

  private sasHours(type: ExportType, raw: string | null): number | undefined {
    if (raw === null) return type.sasDefaultHours;
    if (!/^\d+$/.test(raw)) return undefined;
    const hours = Number(raw);
    return hours >= 1 && hours <= type.sasMaxHours ? hours : undefined;
  }

  private rateLimitWaitInSeconds(key: string, perMinute: number, perHour: number): number {
    const now = Date.now();
    const history = (this.calls.get(key) ?? []).filter((t) => t > now - 3_600_000);
    const lastMinute = history.filter((t) => t > now - 60_000);
    let wait = 0;
    if (lastMinute.length >= perMinute) {
      wait = Math.max(wait, (lastMinute[lastMinute.length - perMinute] ?? now) + 60_000 - now);
    }
    if (history.length >= perHour) wait = Math.max(wait, (history[history.length - perHour] ?? now) + 3_600_000 - now);
    if (wait === 0) history.push(now);
    this.calls.set(key, history);
    return Math.ceil(wait / 1000);
  }

  private sasUrl(snapshot: SimulatedSnapshot, blobName: string, expiresOn: Date): string {
    const sas = generateBlobSASQueryParameters(
      {
        containerName: snapshot.container,
        blobName,
        permissions: BlobSASPermissions.parse('r'),
        startsOn: new Date(Math.min(Date.now(), expiresOn.getTime()) - 5 * 60_000),
        expiresOn,
      },
      this.sharedKey,
    ).toString();
    const signature = new URLSearchParams(sas).get('sig');
    if (signature) {
      this.issuedSecrets.add(signature);
      this.issuedSecrets.add(encodeURIComponent(signature));
    }
    return `${this.blobService.getContainerClient(snapshot.container).getBlobClient(blobName).url}?${sas}`;
  }
}

function uuidFrom(rng: () => number): string {
  const h = Array.from({ length: 32 }, () => Math.floor(rng() * 16).toString(16)).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-a${h.slice(17, 20)}-${h.slice(20, 32)}`;
}
