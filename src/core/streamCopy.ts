import { createHash, randomBytes } from 'node:crypto';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import type { BlobClient, BlobGetPropertiesResponse, BlockBlobClient } from '@azure/storage-blob';
import type { CopyOptions, CopyRequest } from './copier.js';
import { classifyStorageError, isStorageCondition, landingContainerMissing, MdvmError } from './errors.js';

/**
 * The stream copy path (MDVM_COPY_MODE=stream): the bytes pass through this process, for sources the storage
 * service cannot read itself, and for MD5 and record counts computed on the way.
 */

/**
 * Block ids must all have the same length: every attempt's prefix has ten characters, like the default. Each copy
 * attempt (block path and stream path alike) stages under a prefix of its own, so two attempts of the same part,
 * concurrent or one after a crash, can never mix blocks, whatever version of the source each read.
 */
export function blockId(index: number, attempt = 'mdvm-block'): string {
  return Buffer.from(`${attempt}-${String(index).padStart(6, '0')}`).toString('base64');
}

/**
 * Download → stage blocks → commit, holding at most `streamBuffers` blocks of `streamBufferBytes`
 * in memory. MD5 is computed on the way; with countRecords a gunzip tap counts JSON lines and
 * a truncated or corrupt gzip stops the copy before anything is committed.
 */
export async function streamCopy(
  source: BlobClient,
  dest: BlockBlobClient,
  sourceProps: BlobGetPropertiesResponse,
  request: Pick<CopyRequest, 'metadata' | 'abortSignal'>,
  conditions: { ifNoneMatch?: string },
  options: Pick<CopyOptions, 'streamBuffers' | 'streamBufferBytes' | 'countRecords'>,
): Promise<{ md5: string; bytes: number; records: number | undefined; etag: string | undefined }> {
  let download: Awaited<ReturnType<BlobClient['download']>>;
  try {
    // Pinned to the version whose size and MD5 we read: a source replaced since answers 412 instead of other bytes.
    download = await source.download(0, undefined, {
      abortSignal: request.abortSignal,
      ...(sourceProps.etag ? { conditions: { ifMatch: sourceProps.etag } } : {}),
    });
  } catch (error) {
    if (isStorageCondition(error, 'precondition-failed')) throw error;
    throw classifyStorageError(error, 'download source');
  }
  const body = download.readableStreamBody;
  if (!body) throw new MdvmError('fatal', 'download returned no body stream');

  const hash = createHash('md5');
  const counter = options.countRecords ? new LineCounter() : undefined;
  const gunzip = counter ? createGunzip({ chunkSize: 256 * 1024 }) : undefined;
  const gunzipDone = gunzip && counter ? pipeline(gunzip, counter) : undefined;
  // The gunzip side must not reject unobserved while the upload is still running.
  gunzipDone?.catch(() => {});

  const attempt = randomBytes(5).toString('hex');
  const ids: string[] = [];
  const inFlight = new Set<Promise<void>>();
  let firstError: unknown;
  let total = 0;
  // A fixed pool of block buffers, filled in place and reused once their block is staged: the bytes of a part of
  // any size pass through `streamBuffers` allocations, not one per block.
  const pool = new BlockPool(options.streamBuffers, options.streamBufferBytes);
  let block = pool.take();
  let filled = 0;

  const stage = (buffer: Buffer, length: number): void => {
    const id = blockId(ids.length, attempt);
    ids.push(id);
    const p = dest
      .stageBlock(id, buffer.subarray(0, length), length, { abortSignal: request.abortSignal })
      .then(() => undefined)
      .catch((error: unknown) => {
        firstError ??= error;
      })
      .finally(() => {
        inFlight.delete(p);
        pool.give(buffer);
      });
    inFlight.add(p);
  };
  const nextBlock = async (): Promise<Buffer> => {
    for (let free = pool.take(); ; free = pool.take()) {
      if (free) return free;
      await Promise.race(inFlight);
    }
  };

  try {
    for await (const piece of body as AsyncIterable<Buffer>) {
      if (firstError) break;
      hash.update(piece);
      total += piece.length;
      if (gunzip && !gunzip.destroyed && !gunzip.write(piece)) await onceDrained(gunzip);
      for (let offset = 0; offset < piece.length; ) {
        block ??= await nextBlock();
        const copied = piece.copy(block, filled, offset);
        filled += copied;
        offset += copied;
        if (filled === block.length) {
          stage(block, filled);
          block = undefined;
          filled = 0;
        }
      }
    }
    if (block && filled > 0) stage(block, filled);
    await Promise.all(inFlight);
    if (firstError) {
      throw landingContainerMissing(firstError, dest.containerName) ?? classifyStorageError(firstError, 'stage block');
    }
    if (gunzip && gunzipDone) {
      gunzip.end();
      try {
        await gunzipDone;
      } catch (error) {
        throw new MdvmError(
          'invalid-input',
          `source is not a complete gzip stream (${(error as Error).message}); nothing was committed`,
          { cause: error },
        );
      }
    }
  } catch (error) {
    gunzip?.destroy();
    await Promise.allSettled(inFlight);
    throw error instanceof MdvmError ? error : classifyStorageError(error, 'stream copy');
  }

  const md5 = hash.digest();
  let committed: Awaited<ReturnType<BlockBlobClient['commitBlockList']>>;
  try {
    committed = await dest.commitBlockList(ids, {
      metadata: request.metadata,
      blobHTTPHeaders: {
        ...(sourceProps.contentType ? { blobContentType: sourceProps.contentType } : {}),
        blobContentMD5: md5,
      },
      conditions,
      abortSignal: request.abortSignal,
    });
  } catch (error) {
    if (isStorageCondition(error, 'already-exists')) throw error;
    throw landingContainerMissing(error, dest.containerName) ?? classifyStorageError(error, 'commit block list');
  }
  return { md5: md5.toString('base64'), bytes: total, records: counter?.records, etag: committed.etag };
}

/** `count` buffers of `size` bytes, allocated on first use and handed out again once given back. */
export class BlockPool {
  private readonly free: Buffer[] = [];
  private allocated = 0;

  constructor(
    private readonly count: number,
    private readonly size: number,
  ) {}

  take(): Buffer | undefined {
    const reused = this.free.pop();
    if (reused) return reused;
    if (this.allocated >= this.count) return undefined;
    this.allocated++;
    return Buffer.allocUnsafeSlow(this.size);
  }

  give(buffer: Buffer): void {
    this.free.push(buffer);
  }
}

/** Resolves on 'drain', and also when the stream errors or closes: a broken gunzip never drains. */
function onceDrained(stream: NodeJS.WritableStream & NodeJS.EventEmitter): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      stream.off('drain', done);
      stream.off('error', done);
      stream.off('close', done);
      resolve();
    };
    stream.once('drain', done);
    stream.once('error', done);
    stream.once('close', done);
  });
}

/** Counts non-empty lines of decompressed JSON Lines without holding them (Spark writes no blank lines). */
class LineCounter extends Writable {
  records = 0;
  private lineHasContent = false;

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    // indexOf is native and ~8x faster than a byte loop; a line counts when it is not empty.
    let start = 0;
    for (let nl = chunk.indexOf(0x0a, start); nl !== -1; nl = chunk.indexOf(0x0a, start)) {
      const length = nl - start - (nl > start && chunk[nl - 1] === 0x0d ? 1 : 0);
      if (length > 0 || this.lineHasContent) this.records++;
      this.lineHasContent = false;
      start = nl + 1;
    }
    if (start < chunk.length && !(chunk.length - start === 1 && chunk[start] === 0x0d)) this.lineHasContent = true;
    callback();
  }

  override _final(callback: (error?: Error | null) => void): void {
    if (this.lineHasContent) this.records++;
    callback();
  }
}
