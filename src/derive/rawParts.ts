import { createHash } from 'node:crypto';
import { createInterface } from 'node:readline';
import { type Readable, Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { parseJson, type SnapshotManifest } from '../core/contracts.js';
import { classifyStorageError, isStorageCondition, MdvmError } from '../core/errors.js';
import type { Runtime } from '../core/runtime.js';

/**
 * The records of one landed raw part, parsed, in order. Derived data is made only from the bytes the raw manifest
 * promises: the part's length and MD5 are checked against its manifest entry as the reading ends (a mismatch throws
 * after the last record, before the caller commits anything). Leaving the loop early (a break, a throw in the caller)
 * destroys the download, so no half-read response stays open.
 */
export async function* readRawRecords(
  runtime: Runtime,
  part: SnapshotManifest['parts'][number],
  options: { abortSignal?: AbortSignal } = {},
): AsyncGenerator<Record<string, unknown>> {
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
  let line = 0;
  try {
    for await (const text of createInterface({ input: gunzip, crlfDelay: Number.POSITIVE_INFINITY })) {
      line++;
      if (text.trim() === '') continue;
      const record = parseJson(text);
      if (record === null || typeof record !== 'object' || Array.isArray(record)) {
        throw new MdvmError('fatal', `${part.path}: line ${line} is not a JSON object`);
      }
      yield record as Record<string, unknown>;
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
}
