import { redact } from './redact.js';

/**
 * Every failure is classified once, where it happens, into one of these kinds; callers act on
 * the kind, never on raw status codes.
 *
 * - `rate-limited`: the service asked us to wait (`retryAfterInMs`).
 * - `expired`: a SAS URL is no longer valid; a fresh one from the next timer tick fixes it.
 * - `not-found`: the source is gone; retrying the same URL cannot help.
 * - `transient`: network trouble, 5xx, throttling; retrying later may help.
 * - `invalid-input`: a message, response or setting is malformed; retrying cannot help.
 * - `forbidden`: credentials work but lack a permission; an operator must act. Never retried in a backoff loop
 *   (`retryable` is false). A part copy that meets it is still redelivered by the queue up to maxDequeueCount:
 *   a role assignment that is still propagating starts to work on its own, and after the last delivery the
 *   message waits on the poison queue for `mdvm-ingest requeue` once the permission is fixed.
 * - `fatal`: anything else we do not understand; surfaced loudly.
 */
export type ErrorKind =
  | 'rate-limited'
  | 'expired'
  | 'not-found'
  | 'transient'
  | 'invalid-input'
  | 'forbidden'
  | 'fatal';

export class MdvmError extends Error {
  readonly kind: ErrorKind;
  readonly retryAfterInMs: number | undefined;
  readonly statusCode: number | undefined;

  constructor(
    kind: ErrorKind,
    message: string,
    options: { cause?: unknown; retryAfterInMs?: number; statusCode?: number } = {},
  ) {
    super(redact(message), options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'MdvmError';
    this.kind = kind;
    this.retryAfterInMs = options.retryAfterInMs;
    this.statusCode = options.statusCode;
  }

  get retryable(): boolean {
    return this.kind === 'transient' || this.kind === 'rate-limited';
  }
}

interface RestLikeError {
  statusCode?: number;
  code?: string;
  message?: string;
  name?: string;
}

const NETWORK_CODES = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ETIMEDOUT',
  'EPIPE',
  'ENOTFOUND',
  'EAI_AGAIN',
  'UND_ERR_SOCKET',
  'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_HEADERS_TIMEOUT',
  'UND_ERR_BODY_TIMEOUT',
  'REQUEST_SEND_ERROR',
]);

/**
 * Classify an error thrown by the Azure Storage SDK (RestError) or the network stack.
 * `what` names the operation for the message, e.g. "copy from source".
 */
export function classifyStorageError(error: unknown, what: string): MdvmError {
  if (error instanceof MdvmError) return error;
  const e = (error ?? {}) as RestLikeError;
  const status = e.statusCode;
  const code = e.code ?? '';
  const detail = `${what} failed: ${status ?? ''} ${code} ${firstLine(e.message)}`.replace(/\s+/g, ' ').trim();
  const options = { cause: error, ...(status === undefined ? {} : { statusCode: status }) };
  if (status === 404 || code === 'BlobNotFound' || code === 'ContainerNotFound') {
    return new MdvmError('not-found', detail, options);
  }
  if (status === 403 && /AuthenticationFailed|AuthorizationFailure|CannotVerifyCopySource/i.test(code)) {
    return new MdvmError('expired', detail, options);
  }
  if (status === 403) return new MdvmError('forbidden', detail, options);
  if (status === 429 || status === 503 || status === 500 || status === 502 || status === 504 || status === 408) {
    return new MdvmError('transient', detail, options);
  }
  if (status === undefined && (NETWORK_CODES.has(code) || e.name === 'AbortError')) {
    return new MdvmError('transient', detail, options);
  }
  if (status !== undefined && status >= 400 && status < 500) return new MdvmError('fatal', detail, options);
  return new MdvmError('transient', detail, options);
}

/**
 * A write to the landing container answered ContainerNotFound: the container was deleted. That is the operator's to
 * fix, never a lost source (a copy reports an unreadable source as CannotVerifyCopySource), so the part is not
 * written off: it is retried, and parked on the poison queue for `requeue` once the container is back.
 */
export function landingContainerMissing(error: unknown, container: string): MdvmError | undefined {
  if ((error as RestLikeError | undefined)?.code !== 'ContainerNotFound') return undefined;
  return new MdvmError(
    'fatal',
    `the landing container ${container} does not exist (deleted?): recreate it (azd provision), then \`mdvm-ingest requeue\` what reached the poison queue`,
    { cause: error, statusCode: 404 },
  );
}

/**
 * Conditions of a storage response that callers expect and handle (a row that is not there, a create-only write
 * that lost the race, an ETag that moved), named once here so no caller tests status codes or error codes itself.
 */
export type StorageCondition =
  | 'not-found'
  | 'already-exists'
  | 'precondition-failed'
  | 'conflict'
  | 'forbidden'
  | 'bad-request';

export function storageCondition(error: unknown): StorageCondition | undefined {
  const e = (error ?? {}) as RestLikeError;
  const code = e.code ?? '';
  if (e.statusCode === 404 || code === 'BlobNotFound' || code === 'ContainerNotFound') return 'not-found';
  if (/AlreadyExists$/.test(code)) return 'already-exists';
  if (e.statusCode === 412) return 'precondition-failed';
  if (e.statusCode === 409) return 'conflict';
  if (e.statusCode === 403) return 'forbidden';
  if (e.statusCode === 400) return 'bad-request';
  return undefined;
}

/** Whether a storage error is one of the expected conditions. */
export function isStorageCondition(error: unknown, ...conditions: StorageCondition[]): boolean {
  const condition = storageCondition(error);
  return condition !== undefined && conditions.includes(condition);
}

export function isNetworkError(error: unknown): boolean {
  const e = error as { code?: string; cause?: { code?: string } } | undefined;
  return NETWORK_CODES.has(e?.code ?? '') || NETWORK_CODES.has(e?.cause?.code ?? '');
}

export function errorMessage(error: unknown): string {
  if (error instanceof Error)
    return redact(error.message.trim() === '' ? describeWithoutMessage(error) : error.message);
  return redact(String(error));
}

/**
 * The storage SDKs throw a RestError with an empty message when a response body cannot be read (a 500 whose XML
 * failed, say): name what is known instead of printing nothing.
 */
function describeWithoutMessage(error: Error): string {
  const e = error as RestLikeError & { cause?: unknown };
  const facts = [e.code, e.statusCode === undefined ? undefined : `HTTP ${e.statusCode}`].filter(Boolean).join(', ');
  const cause = e.cause instanceof Error && e.cause.message.trim() !== '' ? `: ${e.cause.message}` : '';
  return `${error.name || 'Error'} without a message${facts ? ` (${facts})` : ''}${cause}`;
}

function firstLine(text: string | undefined): string {
  return (text ?? '').split('\n')[0]?.slice(0, 300) ?? '';
}
