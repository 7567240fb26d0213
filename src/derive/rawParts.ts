import { createHash } from 'node:crypto';
import { type Readable, Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { parseJson, type SnapshotManifest } from '../core/contracts.js';
import { classifyStorageError, isStorageCondition, MdvmError } from '../core/errors.js';
import type { Runtime } from '../core/runtime.js';

/**
 * The longest line a raw part may hold. A line is held whole to be parsed, and V8 cannot make a string of much more
 * than 512 MiB: without a cap one long line would throw a RangeError that takes down every copy in the process.
 */
export const MAX_LINE_BYTES = 32 * 1024 * 1024;

/** One record of a raw part and the length of the line it came from (UTF-8 bytes, without the line end). */
export interface RawRecord {
  readonly record: Record<string, unknown>;
  readonly lineBytes: number;
}

/**
 * The records of one landed raw part, parsed, in order. Derived data is made only from the bytes the raw manifest
 * promises: the part's length and MD5, and its record count when the copy counted one, are checked against its
 * manifest entry as the reading ends (a mismatch throws after the last record, before the caller commits anything).
 * Lines are counted as the copy's record counter counts them (split on `\n` only, one trailing `\r` taken off, every
 * line that is then not empty); a line of only whitespace counts but is no record and is skipped. Leaving the loop
 * early (a break, a throw in the caller) destroys the download, so no half-read response stays open.
 */
export async function* readRawRecords(
  runtime: Runtime,
  part: SnapshotManifest['parts'][number],
  options: { abortSignal?: AbortSignal } = {},
): AsyncGenerator<RawRecord> {
  const response = await runtime.landing
    .getBlobClient(part.path)
    .download(0, undefined, { abortSignal: options.abortSignal })
    .catch((error: unknown) => {
      if (isStorageCondition(error, 'not-found')) {
        throw new MdvmError('fatal', `${part.path} is listed by its manifest but is not in the landing container`);
      }
      throw classifyStorageError(error, `read ${part.path}`);
    });
  const body = response.readableStreamBody as Readable | undefined;
  if (!body) throw new MdvmError('transient', `${part.path}: empty response body`);
  const hash = createHash('md5');
  let bytes = 0;
  const counter = new Transform({
    transform(chunk: Buffer, _encoding, callback: TransformCallback) {
      hash.update(chunk);
      bytes += chunk.length;
      callback(null, chunk);
    },
  });
  const gunzip = createGunzip();
  // pipeline() destroys every stage on a failure, so a broken download or gzip ends the line reader with its error.
  const reading = pipeline(body, counter, gunzip);
  reading.catch(() => undefined);
  let finished = false;
  let lineNumber = 0;
  let nonEmptyLines = 0;
  let whitespaceOnly = 0;
  try {
    for await (const line of splitLines(gunzip as AsyncIterable<Buffer>, part.path)) {
      lineNumber++;
      const length = line.length > 0 && line[line.length - 1] === 0x0d ? line.length - 1 : line.length;
      if (length === 0) continue;
      nonEmptyLines++;
      const text = line.toString('utf8', 0, length);
      if (text.trim() === '') {
        whitespaceOnly++;
        continue;
      }
      const record = parseJson(text);
      if (record === null || typeof record !== 'object' || Array.isArray(record)) {
        throw new MdvmError('fatal', `${part.path}: line ${lineNumber} is not a JSON object`);
      }
      yield { record: record as Record<string, unknown>, lineBytes: length };
    }
    await reading;
    finished = true;
  } catch (error) {
    if (error instanceof MdvmError) throw error;
    if ((error as { code?: string }).code?.startsWith('Z_')) {
      throw new MdvmError('fatal', `${part.path} is not valid gzip: ${(error as Error).message}`);
    }
    throw classifyStorageError(error, `read ${part.path}`);
  } finally {
    if (!finished) {
      body.destroy();
      gunzip.destroy();
    }
  }
  if (bytes !== part.bytes) {
    throw new MdvmError('fatal', `${part.path} has ${bytes} bytes, its manifest says ${part.bytes}`);
  }
  const md5 = hash.digest('base64');
  if (part.md5 && md5 !== part.md5) {
    throw new MdvmError('fatal', `${part.path} is not the part its manifest lists (MD5 ${md5}, manifest ${part.md5})`);
  }
  if (part.records !== null && part.records !== nonEmptyLines) {
    throw new MdvmError(
      'fatal',
      `${part.path}: ${nonEmptyLines} non-empty lines (${whitespaceOnly} of them whitespace only), but the manifest counted ${part.records} records`,
    );
  }
}

/**
 * The lines of a byte stream, split on `\n` (0x0a never occurs inside a UTF-8 sequence, so every line decodes on its
 * own), each without its `\n`; the last one too when the stream does not end with one. A line that would pass
 * MAX_LINE_BYTES throws as soon as it does, before it is buffered whole.
 */
async function* splitLines(source: AsyncIterable<Buffer>, path: string): AsyncGenerator<Buffer> {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let lineNumber = 1;
  const tooLong = () =>
    new MdvmError('fatal', `${path}: line ${lineNumber} is longer than ${MAX_LINE_BYTES / (1024 * 1024)} MiB`);
  for await (const chunk of source) {
    let start = 0;
    for (let newline = chunk.indexOf(0x0a); newline !== -1; newline = chunk.indexOf(0x0a, start)) {
      if (pendingBytes + newline - start > MAX_LINE_BYTES) throw tooLong();
      const piece = chunk.subarray(start, newline);
      yield pending.length === 0 ? piece : Buffer.concat([...pending, piece]);
      pending = [];
      pendingBytes = 0;
      lineNumber++;
      start = newline + 1;
    }
    if (start < chunk.length) {
      pendingBytes += chunk.length - start;
      if (pendingBytes > MAX_LINE_BYTES) throw tooLong();
      pending.push(chunk.subarray(start));
    }
  }
  if (pendingBytes > 0) yield Buffer.concat(pending);
}
