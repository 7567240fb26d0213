import type { Readable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import type { TokenCredential } from '@azure/identity';
import { type Dispatcher, request } from 'undici';
import { z } from 'zod';
import { CallBudget, pagedCallBudget } from './callBudget.js';
import {
  type ExportType,
  JSON_CALLS_PER_HOUR,
  JSON_CALLS_PER_MINUTE,
  VIA_FILES_CALLS_PER_HOUR,
  VIA_FILES_CALLS_PER_MINUTE,
} from './catalog.js';
import { errorMessage, isNetworkError, MdvmError } from './errors.js';
import { inHttpSpan, record } from './observability.js';

const exportFilesResponseSchema = z.looseObject({
  exportFiles: z.array(z.string().min(1)),
  generatedTime: z.iso.datetime({ offset: true }),
});

export interface ExportFilesResponse {
  readonly exportFiles: readonly string[];
  readonly generatedTime: string;
}

export interface DefenderExportClientOptions {
  /** Per-request timeout. */
  timeoutInMs?: number;
  /** Retries after the first attempt for 429, 5xx and network errors. */
  maxRetries?: number;
  /** Never sleep longer than this for one retry (a longer Retry-After fails the call as rate-limited). */
  maxRetryWaitInMs?: number;
  /** Base of the jittered exponential backoff for 5xx and network errors. */
  retryBaseDelayInMs?: number;
  /** Shared per-endpoint budget; one per process keeps every caller within the documented limits. */
  callBudget?: CallBudget;
  /** The same for the paged JSON and delta endpoints (30 calls/minute, 1,000/hour). */
  pagedCallBudget?: CallBudget;
  dispatcher?: Dispatcher;
}

export interface GetExportFilesOptions {
  sasValidHours?: number;
  abortSignal?: AbortSignal;
  /** Called for every retry, for telemetry. */
  onRetry?: (info: { attempt: number; statusCode: number | undefined; waitInMs: number }) => void;
}

/**
 * The most of a response body read into memory: a file list of MDVM_MAX_PARTS_PER_SNAPSHOT (20,000) URLs is a few
 * MiB; an error body is a few hundred bytes. A larger body (a broken or hostile endpoint) is not read whole.
 */
const MAX_LIST_BODY_BYTES = 64 * 1024 * 1024;
const MAX_ERROR_BODY_BYTES = 64 * 1024;

const processBudget = new CallBudget();
const processPagedBudget = pagedCallBudget();
const VIA_FILES_BUDGET = `${VIA_FILES_CALLS_PER_MINUTE}/min, ${VIA_FILES_CALLS_PER_HOUR}/h`;
const JSON_BUDGET = `${JSON_CALLS_PER_MINUTE}/min, ${JSON_CALLS_PER_HOUR}/h`;

/**
 * Client for the Defender "export assessment via files" endpoints, in the Azure SDK style:
 * endpoint + TokenCredential, options bag, abortSignal.
 */
export class DefenderExportClient {
  private readonly endpoint: string;
  private readonly options: Required<Omit<DefenderExportClientOptions, 'dispatcher'>> & { dispatcher?: Dispatcher };

  constructor(
    endpoint: string,
    private readonly credential: TokenCredential,
    private readonly scope: string,
    options: DefenderExportClientOptions = {},
  ) {
    this.endpoint = endpoint.replace(/\/+$/, '');
    this.options = {
      timeoutInMs: options.timeoutInMs ?? 60_000,
      maxRetries: options.maxRetries ?? 4,
      maxRetryWaitInMs: options.maxRetryWaitInMs ?? 90_000,
      retryBaseDelayInMs: options.retryBaseDelayInMs ?? 1_000,
      callBudget: options.callBudget ?? processBudget,
      pagedCallBudget: options.pagedCallBudget ?? processPagedBudget,
      ...(options.dispatcher ? { dispatcher: options.dispatcher } : {}),
    };
  }

  async getExportFiles(exportType: ExportType, options: GetExportFilesOptions = {}): Promise<ExportFilesResponse> {
    const url = new URL(`${this.endpoint}${exportType.apiPath}`);
    if (options.sasValidHours !== undefined) {
      url.searchParams.set('sasValidHours', String(Math.min(options.sasValidHours, exportType.sasMaxHours)));
    }
    return this.call(
      url,
      {
        what: exportType.apiPath,
        permission: exportType.permission,
        metricsExport: exportType.id,
        budget: this.options.callBudget,
        budgetText: VIA_FILES_BUDGET,
      },
      options,
      async (response) => {
        const body = await readBounded(response.body, MAX_LIST_BODY_BYTES);
        if (body.cut) {
          throw new MdvmError(
            'invalid-input',
            `${exportType.apiPath}: the response is larger than ${MAX_LIST_BODY_BYTES / 1024 / 1024} MiB, far more than a file list; nothing recorded`,
          );
        }
        return parseExportFiles(body.text, exportType);
      },
    );
  }

  /**
   * One page of a paged JSON endpoint (`…ByMachine`, the delta): the response body as a stream, for the caller to
   * scan (ODataRecordsTransform) without holding the page. `url` is the first page's or an `@odata.nextLink`,
   * followed verbatim; it must be on the API's own origin, since the request carries the token.
   */
  async openPage(
    url: URL,
    what: { path: string; exportId: string; permission: string },
    options: GetExportFilesOptions = {},
  ): Promise<Readable> {
    if (!sameApi(url, new URL(this.endpoint))) {
      throw new MdvmError(
        'invalid-input',
        `${what.path}: the next page is on ${url.origin}, not on the Defender API (${new URL(this.endpoint).origin}); the token is never sent there`,
      );
    }
    return this.call(
      url,
      {
        what: what.path,
        permission: what.permission,
        metricsExport: what.exportId,
        budget: this.options.pagedCallBudget,
        budgetText: JSON_BUDGET,
      },
      options,
      async (response) => response.body,
    );
  }

  /** One GET with the token, the call budget and retries by error class; `read` takes the 200 response. */
  private async call<T>(
    url: URL,
    endpoint: { what: string; permission: string; metricsExport: string; budget: CallBudget; budgetText: string },
    options: GetExportFilesOptions,
    read: (response: Dispatcher.ResponseData) => Promise<T>,
  ): Promise<T> {
    const budgetKey = `${url.origin}${url.pathname}`.toLowerCase();
    for (let attempt = 0; ; attempt++) {
      const budgetWait = endpoint.budget.waitInMs(budgetKey);
      if (budgetWait > this.options.maxRetryWaitInMs) {
        throw new MdvmError(
          'rate-limited',
          `${endpoint.what}: the documented call budget (${endpoint.budgetText}) is used up for the next ${Math.ceil(budgetWait / 1000)} s`,
          { retryAfterInMs: budgetWait },
        );
      }
      if (budgetWait > 0) await sleep(budgetWait, undefined, { signal: options.abortSignal });
      let token: string;
      try {
        token = await this.getToken(options.abortSignal);
      } catch (error) {
        const failure = error as MdvmError;
        if (!failure.retryable || attempt >= this.options.maxRetries || options.abortSignal?.aborted) throw failure;
        const waitInMs = Math.min(this.backoff(attempt), this.options.maxRetryWaitInMs);
        options.onRetry?.({ attempt: attempt + 1, statusCode: undefined, waitInMs });
        await sleep(waitInMs, undefined, { signal: options.abortSignal });
        continue;
      }
      endpoint.budget.record(budgetKey);

      let failure: MdvmError;
      try {
        const response = await inHttpSpan(
          'GET',
          url,
          { export: endpoint.metricsExport, attempt: attempt + 1 },
          async () => {
            const answer = await request(url, {
              method: 'GET',
              headers: { authorization: `Bearer ${token}`, accept: 'application/json' },
              headersTimeout: this.options.timeoutInMs,
              bodyTimeout: this.options.timeoutInMs,
              ...(options.abortSignal ? { signal: options.abortSignal } : {}),
              ...(this.options.dispatcher ? { dispatcher: this.options.dispatcher } : {}),
            });
            return answer;
          },
        );
        record.defenderCall(endpoint.metricsExport, response.statusCode);
        if (response.statusCode === 200) return await read(response);
        const errorBody = await readBounded(response.body, MAX_ERROR_BODY_BYTES);
        failure = classifyDefenderResponse(response.statusCode, errorBody.text, response.headers, endpoint);
      } catch (error) {
        if (error instanceof MdvmError) throw error;
        record.defenderCall(endpoint.metricsExport, undefined);
        if (options.abortSignal?.aborted) {
          throw new MdvmError(
            'transient',
            `${endpoint.what}: stopped waiting for Defender (interrupted or out of time)`,
            {
              cause: error,
            },
          );
        }
        if (!isNetworkError(error)) {
          throw new MdvmError('transient', `${endpoint.what}: request failed: ${errorMessage(error)}`, {
            cause: error,
          });
        }
        failure = new MdvmError('transient', `${endpoint.what}: network error: ${errorMessage(error)}`, {
          cause: error,
        });
      }

      if (!failure.retryable || attempt >= this.options.maxRetries) throw failure;
      const waitInMs =
        failure.kind === 'rate-limited'
          ? (failure.retryAfterInMs ?? this.backoff(attempt))
          : Math.min(this.backoff(attempt), this.options.maxRetryWaitInMs);
      if (waitInMs > this.options.maxRetryWaitInMs) throw failure;
      options.onRetry?.({ attempt: attempt + 1, statusCode: failure.statusCode, waitInMs });
      await sleep(waitInMs, undefined, { signal: options.abortSignal });
    }
  }

  private async getToken(abortSignal: AbortSignal | undefined): Promise<string> {
    try {
      const token = await this.credential.getToken(this.scope, abortSignal ? { abortSignal } : {});
      if (!token) throw new Error('the credential returned no token');
      return token.token;
    } catch (error) {
      // The identity endpoint down or busy is not a permission problem: retried like any other transient failure,
      // and reported as what it is.
      throw new MdvmError(
        abortSignal?.aborted || identityEndpointFailed(error) ? 'transient' : 'forbidden',
        `could not get a token for ${this.scope} (MDVM_DEFENDER_TOKEN_SCOPE): ${errorMessage(error)}`,
        { cause: error },
      );
    }
  }

  /** Equal jitter: uniform in [c/2, c] where c = base * 2^attempt, capped at 30 s. */
  private backoff(attempt: number): number {
    const ceiling = Math.min(30_000, this.options.retryBaseDelayInMs * 2 ** attempt);
    return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
  }
}

/**
 * Whether a page link may carry the token: the configured API origin, or (for links Defender writes with another
 * of its own hosts: the geo hosts, the legacy and US Gov ones) https on a documented Defender API host.
 */
export function sameApi(url: URL, api: URL): boolean {
  if (url.origin === api.origin) return true;
  return url.protocol === 'https:' && url.port === '' && DEFENDER_API_HOSTS.some((host) => host.test(url.hostname));
}

const DEFENDER_API_HOSTS = [
  /^([a-z]{2,3}\.)?api\.security\.microsoft\.com$/,
  /^api(-[a-z]{2,3})?\.securitycenter\.microsoft\.com$/,
  /^api-(gcc|gov)\.securitycenter\.microsoft\.us$/,
];

function parseExportFiles(text: string, exportType: ExportType): ExportFilesResponse {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new MdvmError('invalid-input', `${exportType.apiPath}: the response is not JSON`);
  }
  const parsed = exportFilesResponseSchema.safeParse(json);
  if (!parsed.success) {
    const why = parsed.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ');
    throw new MdvmError('invalid-input', `${exportType.apiPath}: unexpected response shape (${why})`);
  }
  return { exportFiles: parsed.data.exportFiles, generatedTime: parsed.data.generatedTime };
}

function classifyDefenderResponse(
  statusCode: number,
  body: string,
  headers: Record<string, string | string[] | undefined>,
  endpoint: { what: string; permission: string },
): MdvmError {
  const { code, target, message } = parseErrorBody(body);
  const ref = `${code ? ` ${code}` : ''}${target ? `, target ${target}` : ''}`;
  const where = endpoint.what;
  if (statusCode === 401) {
    return new MdvmError(
      'forbidden',
      `${where}: 401 Unauthorized${ref}: the Defender API rejected the token; check the identity and MDVM_DEFENDER_TOKEN_SCOPE`,
      { statusCode },
    );
  }
  if (statusCode === 403) {
    return new MdvmError(
      'forbidden',
      `${where}: 403 Forbidden${ref}: the identity lacks the WindowsDefenderATP application permission '${endpoint.permission}' (grant it with admin consent; see README "Defender API permissions")`,
      { statusCode },
    );
  }
  if (statusCode === 429) {
    return new MdvmError('rate-limited', `${where}: 429 Too Many Requests${ref}`, {
      statusCode,
      retryAfterInMs: parseRetryAfter(headers['retry-after']) ?? 60_000,
    });
  }
  if (statusCode >= 500 || statusCode === 408) {
    return new MdvmError('transient', `${where}: ${statusCode} server error${ref}`, { statusCode });
  }
  if (statusCode === 400) {
    return new MdvmError('fatal', `${where}: 400 Bad Request${ref}${message ? `: ${message.slice(0, 300)}` : ''}`, {
      statusCode,
    });
  }
  return new MdvmError('fatal', `${where}: unexpected ${statusCode}${ref}`, { statusCode });
}

function parseErrorBody(body: string): { code?: string; target?: string; message?: string } {
  try {
    const parsed = JSON.parse(body) as { error?: { code?: unknown; target?: unknown; message?: unknown } };
    const code = typeof parsed.error?.code === 'string' ? parsed.error.code : undefined;
    const target = typeof parsed.error?.target === 'string' ? parsed.error.target : undefined;
    const message = typeof parsed.error?.message === 'string' ? parsed.error.message : undefined;
    return { ...(code ? { code } : {}), ...(target ? { target } : {}), ...(message ? { message } : {}) };
  } catch {
    return {};
  }
}

/**
 * Whether a token request failed because the identity endpoint was down or busy rather than because it refused. The
 * credential chain wraps the cause twice (AggregateAuthenticationError → CredentialUnavailableError → MSAL's
 * ServerError with `status`, or ClientAuthError `network_error`): the whole tree is searched.
 */
function identityEndpointFailed(error: unknown, depth = 0): boolean {
  if (!error || typeof error !== 'object' || depth > 5) return false;
  const e = error as { statusCode?: unknown; status?: unknown; errorCode?: unknown; errors?: unknown; cause?: unknown };
  const status = typeof e.statusCode === 'number' ? e.statusCode : typeof e.status === 'number' ? e.status : undefined;
  if (status !== undefined && (status === 429 || status >= 500)) return true;
  if (e.errorCode === 'network_error' || isNetworkError(error)) return true;
  const inner = [...(Array.isArray(e.errors) ? e.errors : []), e.cause];
  return inner.some((x) => identityEndpointFailed(x, depth + 1));
}

/** The body as text, reading at most `maxBytes`; a longer body is cut there and the rest not read. */
async function readBounded(
  body: Dispatcher.ResponseData['body'],
  maxBytes: number,
): Promise<{ text: string; cut: boolean }> {
  const chunks: Buffer[] = [];
  let bytes = 0;
  for await (const chunk of body) {
    const buffer = chunk as Buffer;
    if (bytes + buffer.length > maxBytes) {
      body.destroy();
      return { text: Buffer.concat(chunks).toString('utf8'), cut: true };
    }
    chunks.push(buffer);
    bytes += buffer.length;
  }
  return { text: Buffer.concat(chunks).toString('utf8'), cut: false };
}

/** Retry-After is either delta-seconds or an HTTP date. */
export function parseRetryAfter(value: string | string[] | undefined, now: number = Date.now()): number | undefined {
  const text = Array.isArray(value) ? value[0] : value;
  if (!text) return undefined;
  const trimmed = text.trim();
  if (/^\d+(\.\d+)?$/.test(trimmed)) return Math.ceil(Number(trimmed) * 1000);
  // Only an HTTP date is read as one: Date.parse takes '-5' or '1.5.' for dates decades ago, which would mean
  // "retry at once".
  if (!/^[A-Za-z]{3}, \d{1,2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT$/.test(trimmed)) return undefined;
  const date = Date.parse(trimmed);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}
