import { setTimeout as sleep } from 'node:timers/promises';
import type { TokenCredential } from '@azure/identity';
import { type Dispatcher, request } from 'undici';
import { z } from 'zod';
import { CallBudget } from './callBudget.js';
import type { ExportType } from './catalog.js';
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
  dispatcher?: Dispatcher;
}

export interface GetExportFilesOptions {
  sasValidHours?: number;
  abortSignal?: AbortSignal;
  /** Called for every retry, for telemetry. */
  onRetry?: (info: { attempt: number; statusCode: number | undefined; waitInMs: number }) => void;
}

const processBudget = new CallBudget();

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
      ...(options.dispatcher ? { dispatcher: options.dispatcher } : {}),
    };
  }

  async getExportFiles(exportType: ExportType, options: GetExportFilesOptions = {}): Promise<ExportFilesResponse> {
    const url = new URL(`${this.endpoint}${exportType.apiPath}`);
    if (options.sasValidHours !== undefined) {
      url.searchParams.set('sasValidHours', String(Math.min(options.sasValidHours, exportType.sasMaxHours)));
    }
    const budgetKey = `${this.endpoint}${exportType.apiPath}`.toLowerCase();
    for (let attempt = 0; ; attempt++) {
      const budgetWait = this.options.callBudget.waitInMs(budgetKey);
      if (budgetWait > this.options.maxRetryWaitInMs) {
        throw new MdvmError(
          'rate-limited',
          `${exportType.apiPath}: the documented call budget (5/min, 20/h) is used up for the next ${Math.ceil(budgetWait / 1000)} s`,
          { retryAfterInMs: budgetWait },
        );
      }
      if (budgetWait > 0) await sleep(budgetWait, undefined, { signal: options.abortSignal });
      const token = await this.getToken(options.abortSignal);
      this.options.callBudget.record(budgetKey);

      let failure: MdvmError;
      try {
        const response = await inHttpSpan('GET', url, { export: exportType.id, attempt: attempt + 1 }, async () => {
          const answer = await request(url, {
            method: 'GET',
            headers: { authorization: `Bearer ${token}`, accept: 'application/json' },
            headersTimeout: this.options.timeoutInMs,
            bodyTimeout: this.options.timeoutInMs,
            ...(options.abortSignal ? { signal: options.abortSignal } : {}),
            ...(this.options.dispatcher ? { dispatcher: this.options.dispatcher } : {}),
          });
          return { statusCode: answer.statusCode, headers: answer.headers, text: await answer.body.text() };
        });
        const text = response.text;
        record.defenderCall(exportType.id, response.statusCode);
        if (response.statusCode === 200) return parseExportFiles(text, exportType);
        failure = classifyDefenderResponse(response.statusCode, text, response.headers, exportType);
      } catch (error) {
        if (error instanceof MdvmError) throw error;
        record.defenderCall(exportType.id, undefined);
        if (options.abortSignal?.aborted) {
          throw new MdvmError(
            'transient',
            `${exportType.apiPath}: stopped waiting for Defender (interrupted or out of time)`,
            {
              cause: error,
            },
          );
        }
        if (!isNetworkError(error)) {
          throw new MdvmError('transient', `${exportType.apiPath}: request failed: ${errorMessage(error)}`, {
            cause: error,
          });
        }
        failure = new MdvmError('transient', `${exportType.apiPath}: network error: ${errorMessage(error)}`, {
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
      throw new MdvmError(
        'forbidden',
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
  exportType: ExportType,
): MdvmError {
  const { code, target } = parseErrorBody(body);
  const ref = `${code ? ` ${code}` : ''}${target ? `, target ${target}` : ''}`;
  const where = exportType.apiPath;
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
      `${where}: 403 Forbidden${ref}: the identity lacks the WindowsDefenderATP application permission '${exportType.permission}' (grant it with admin consent; see README "Defender API permissions")`,
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
  return new MdvmError('fatal', `${where}: unexpected ${statusCode}${ref}`, { statusCode });
}

function parseErrorBody(body: string): { code?: string; target?: string } {
  try {
    const parsed = JSON.parse(body) as { error?: { code?: unknown; target?: unknown } };
    const code = typeof parsed.error?.code === 'string' ? parsed.error.code : undefined;
    const target = typeof parsed.error?.target === 'string' ? parsed.error.target : undefined;
    return { ...(code ? { code } : {}), ...(target ? { target } : {}) };
  } catch {
    return {};
  }
}

/** Retry-After is either delta-seconds or an HTTP date. */
export function parseRetryAfter(value: string | string[] | undefined, now: number = Date.now()): number | undefined {
  const text = Array.isArray(value) ? value[0] : value;
  if (!text) return undefined;
  if (/^\d+$/.test(text.trim())) return Number(text.trim()) * 1000;
  const date = Date.parse(text);
  return Number.isNaN(date) ? undefined : Math.max(0, date - now);
}
