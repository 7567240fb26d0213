import { once } from 'node:events';
import type { ServerResponse } from 'node:http';
import { DELTA_EXPORT, type ExportId, type ExportType, MAX_PAGE_SIZE } from '../core/catalog.js';
import { generateRecords } from './records.js';

/**
 * The paged JSON endpoints of the simulated Defender API: the eight `…ByMachine` siblings (the current via-files
 * snapshot's records, in part order) and the software-vulnerability delta (`SoftwareVulnerabilityChangesByMachine`),
 * as documented: `pageSize` (default 50,000, at most 200,000), `$top` (that many rows and no nextLink), paging by an
 * `@odata.nextLink` that carries a `$skiptoken`, `sinceTime` required for the delta and at most 14 days back, the
 * delta produced in 6-hour slices. Responses are written as they are produced, so a page of 200,000 records never
 * exists as one string here either.
 */

export interface PagedSnapshotPart {
  readonly records: number;
  /** How the simulator generated the part's lines: the same seed gives the same records. */
  readonly generator: { readonly seed: string; readonly rbacGroupId: number };
}

export interface PagedSnapshot {
  readonly exportId: ExportId;
  readonly generatedTime: string;
  readonly parts: readonly PagedSnapshotPart[];
}

/** One 6-hour slice of the delta: `records` changes with EventTimestamp `at`. */
export interface DeltaSlice {
  readonly at: string;
  readonly records: number;
  /** The first two records are one device that moved RBAC group: Fixed under the old group, New under the new. */
  readonly rbacMove?: boolean;
}

export type PageFault =
  | { kind: 'status'; status: number; code?: string; retryAfterSeconds?: number }
  /** The body stops half-way and the connection drops. */
  | { kind: 'truncate' }
  /** The page's nextLink points at another host. */
  | { kind: 'foreign-next-link' };

interface PageCursor {
  readonly TimePath?: string;
  readonly SliceAt?: string;
  readonly Index: number;
  readonly LineStoppedAt: number;
}

export type PagedError = (status: number, code: string, message: string, headers?: Record<string, string>) => void;

const DEFAULT_PAGE_SIZE = 50_000;

/** TimePath of a generatedTime, as Microsoft's skiptokens carry it: `2026-11-22/1801/`. */
export function timePathOf(generatedTime: string): string {
  return `${generatedTime.slice(0, 10)}/${generatedTime.slice(11, 13)}${generatedTime.slice(14, 16)}/`;
}

export class PagedEndpoints {
  private readonly slices: DeltaSlice[] = [];
  private readonly faults: { target: string; fault: PageFault; afterPages: number }[] = [];

  constructor(
    private readonly baseUrl: string,
    private readonly seed: string,
    private readonly snapshotOf: (exportId: ExportId, timePath?: string) => PagedSnapshot | undefined,
  ) {}

  publishDeltaSlice(slice: DeltaSlice): void {
    this.slices.push(slice);
    this.slices.sort((a, b) => Date.parse(a.at) - Date.parse(b.at));
  }

  get deltaSlices(): readonly DeltaSlice[] {
    return this.slices;
  }

  /** A fault for `target` (an export id, or the delta's id), after `afterPages` more pages were served normally. */
  injectFault(target: string, fault: PageFault, options: { afterPages?: number; times?: number } = {}): void {
    for (let i = 0; i < (options.times ?? 1); i++) {
      this.faults.push({ target, fault, afterPages: options.afterPages ?? 0 });
    }
  }

  /** Every record of a delta slice, as JSON lines (what the delta endpoint pages through). */
  deltaLines(slice: DeltaSlice): string[] {
    const lines = splitLines(
      generateRecords('software-vulnerabilities', `${this.seed}/delta/${slice.at}`, 12, slice.records),
    );
    const statuses = ['New', 'Fixed', 'Updated'] as const;
    const eventTimestamp = new Date(slice.at).toISOString();
    return lines.map((line, i) => {
      const record = JSON.parse(line) as Record<string, unknown>;
      if (slice.rbacMove && i === 1) {
        const moved = JSON.parse(lines[0] ?? '{}') as Record<string, unknown>;
        return JSON.stringify({
          ...moved,
          rbacGroupId: 57,
          rbacGroupName: 'Finance Laptops',
          status: 'New',
          eventTimestamp,
        });
      }
      const status = slice.rbacMove && i === 0 ? 'Fixed' : statuses[i % 3];
      return JSON.stringify({ ...record, status, eventTimestamp });
    });
  }

  async serveSnapshot(type: ExportType, url: URL, res: ServerResponse, error: PagedError): Promise<void> {
    const paging = this.paging(url, error);
    if (!paging) return;
    const cursor = paging.cursor;
    const snapshot = this.snapshotOf(type.id as ExportId, cursor?.TimePath);
    if (!snapshot) return error(404, 'ResourceNotFound', 'no export has been generated yet');
    const timePath = timePathOf(snapshot.generatedTime);
    const sources = snapshot.parts.map((part) => ({
      records: part.records,
      lines: () =>
        splitLines(generateRecords(type.id as ExportId, part.generator.seed, part.generator.rbacGroupId, part.records)),
    }));
    await this.servePage(type.id, url, res, paging, sources, (index, line) => ({
      TimePath: timePath,
      Index: index,
      LineStoppedAt: line,
    }));
  }

  async serveDelta(url: URL, res: ServerResponse, error: PagedError, now: number): Promise<void> {
    const since = url.searchParams.get('sinceTime');
    if (!since) return error(400, 'MissingRequiredParameter', 'sinceTime is required');
    const sinceMs = Date.parse(since);
    if (Number.isNaN(sinceMs)) return error(400, 'InvalidInput', `sinceTime '${since}' is not an ISO-8601 time`);
    if (sinceMs < now - DELTA_EXPORT.maxLookbackInMs) {
      return error(400, 'InvalidInput', 'sinceTime cannot be more than 14 days in the past');
    }
    const paging = this.paging(url, error);
    if (!paging) return;
    // Changes from the 6-hour slice that sinceTime falls in up to the newest generated data.
    const sliceStart = Math.floor(sinceMs / DELTA_EXPORT.sliceInMs) * DELTA_EXPORT.sliceInMs;
    const slices = this.slices.filter((s) => Date.parse(s.at) >= sliceStart && Date.parse(s.at) <= now);
    const sources = slices.map((slice) => ({ records: slice.records, lines: () => this.deltaLines(slice) }));
    await this.servePage(DELTA_EXPORT.id, url, res, paging, sources, (index, line) => ({
      SliceAt: slices[index]?.at ?? '',
      Index: index,
      LineStoppedAt: line,
    }));
  }

  private paging(
    url: URL,
    error: PagedError,
  ): { pageSize: number; top: number | undefined; cursor: PageCursor | undefined } | undefined {
    const rawSize = url.searchParams.get('pageSize');
    const pageSize = rawSize === null ? DEFAULT_PAGE_SIZE : Number(rawSize);
    if (!Number.isInteger(pageSize) || pageSize < 1 || pageSize > MAX_PAGE_SIZE) {
      error(400, 'InvalidInput', `pageSize must be a whole number from 1 to ${MAX_PAGE_SIZE}`);
      return undefined;
    }
    const rawTop = url.searchParams.get('$top');
    const top = rawTop === null ? undefined : Number(rawTop);
    if (top !== undefined && (!Number.isInteger(top) || top < 1)) {
      error(400, 'InvalidInput', '$top must be a positive whole number');
      return undefined;
    }
    const token = url.searchParams.get('$skiptoken');
    let cursor: PageCursor | undefined;
    if (token !== null) {
      try {
        cursor = JSON.parse(Buffer.from(token, 'base64').toString('utf8')) as PageCursor;
      } catch {
        error(400, 'InvalidInput', 'invalid $skiptoken');
        return undefined;
      }
      if (!Number.isInteger(cursor.Index) || !Number.isInteger(cursor.LineStoppedAt)) {
        error(400, 'InvalidInput', 'invalid $skiptoken');
        return undefined;
      }
    }
    return { pageSize, top, cursor };
  }

  private takeFault(target: string): PageFault | undefined {
    const index = this.faults.findIndex((f) => f.target === target);
    const found = this.faults[index];
    if (!found) return undefined;
    if (found.afterPages > 0) {
      for (const f of this.faults) if (f.target === target) f.afterPages--;
      return undefined;
    }
    this.faults.splice(index, 1);
    return found.fault;
  }

  /** Fault for this request, answered as an error; undefined when the page is to be served (maybe truncated). */
  faultFor(target: string, error: PagedError): PageFault | 'answered' | undefined {
    const fault = this.takeFault(target);
    if (fault?.kind === 'status') {
      error(
        fault.status,
        fault.code ?? (fault.status === 429 ? 'TooManyRequests' : 'InternalServerError'),
        'injected fault',
        fault.retryAfterSeconds === undefined ? {} : { 'retry-after': String(fault.retryAfterSeconds) },
      );
      return 'answered';
    }
    return fault;
  }

  private async servePage(
    target: string,
    url: URL,
    res: ServerResponse,
    paging: { pageSize: number; top: number | undefined; cursor: PageCursor | undefined },
    sources: readonly { records: number; lines: () => string[] }[],
    cursorAt: (index: number, line: number) => PageCursor,
  ): Promise<void> {
    const fault = this.faultFor(target, (status, code, message, headers = {}) => {
      res.writeHead(status, { 'content-type': 'application/json', ...headers });
      res.end(JSON.stringify({ error: { code, message, target: 'simulated' } }));
    });
    if (fault === 'answered') return;
    const limit = paging.top ?? paging.pageSize;
    let index = paging.cursor?.Index ?? 0;
    let line = paging.cursor?.LineStoppedAt ?? 0;
    // Where the page ends, from the counts alone: the nextLink can be written after the records.
    let remaining = limit;
    let endIndex = index;
    let endLine = line;
    while (remaining > 0 && endIndex < sources.length) {
      const available = (sources[endIndex]?.records ?? 0) - endLine;
      if (available > remaining) {
        endLine += remaining;
        remaining = 0;
      } else {
        remaining -= available;
        endIndex++;
        endLine = 0;
      }
    }
    const more =
      paging.top === undefined &&
      sources.slice(endIndex).reduce((sum, s, i) => sum + s.records - (i === 0 ? endLine : 0), 0) > 0;
    let nextLink: string | undefined;
    if (more) {
      // As Defender writes it: the parameters of the request, then a literal `$skiptoken`.
      const origin = fault?.kind === 'foreign-next-link' ? 'https://elsewhere.example.invalid' : this.baseUrl;
      const query = [...url.searchParams]
        .filter(([key]) => key !== '$skiptoken' && key !== 'pageSize')
        .map(([key, value]) => `${key}=${encodeURIComponent(value)}`);
      query.unshift(`pageSize=${paging.pageSize}`);
      const token = Buffer.from(JSON.stringify(cursorAt(endIndex, endLine))).toString('base64');
      nextLink = `${origin}${url.pathname}?${query.join('&')}&$skiptoken=${encodeURIComponent(token)}`;
    }

    res.writeHead(200, { 'content-type': 'application/json; odata.metadata=minimal' });
    let buffer = `{"@odata.context":"${this.baseUrl}/api/$metadata#Collection(microsoft.windowsDefenderATP.api.AssetVulnerability)","value":[`;
    let first = true;
    const flush = async (): Promise<void> => {
      if (!res.write(buffer)) await once(res, 'drain');
      buffer = '';
    };
    let sent = 0;
    while (sent < limit && index < sources.length) {
      const source = sources[index];
      const lines = source ? source.lines() : [];
      for (; line < lines.length && sent < limit; line++, sent++) {
        buffer += `${first ? '' : ','}${lines[line]}`;
        first = false;
        if (buffer.length >= 64 * 1024) await flush();
      }
      if (line >= lines.length) {
        index++;
        line = 0;
      }
    }
    buffer += `]${nextLink ? `,"@odata.nextLink":${JSON.stringify(nextLink)}` : ''}}`;
    if (fault?.kind === 'truncate') {
      // The connection drops before the page's JSON ends.
      buffer = buffer.slice(0, Math.floor(buffer.length / 2));
      await flush();
      res.socket?.destroy();
      return;
    }
    await flush();
    res.end();
  }
}

function splitLines(text: string): string[] {
  return text === '' ? [] : text.replace(/\n$/, '').split('\n');
}
