import { createHash, randomBytes } from 'node:crypto';
import { Writable } from 'node:stream';
import type { BlockBlobClient } from '@azure/storage-blob';
import { classifyStorageError, isStorageCondition, landingContainerMissing } from './errors.js';
import { BlockPool, blockId } from './streamCopy.js';

/**
 * A Writable that lands what is written into one block blob: fixed, reused block buffers (at most `blocks` of
 * `blockBytes` in memory, staged as they fill), MD5 and length counted on the way, nothing visible until
 * `commit`, which stores the MD5 with the blob. Bytes the app produces (a JSON page turned into gzip JSON Lines)
 * take this path; copies of Microsoft's bytes take the copier's.
 */
export class BlockUploadSink extends Writable {
  bytes = 0;
  private readonly hash = createHash('md5');
  private readonly pool: BlockPool;
  private readonly ids: string[] = [];
  private readonly inFlight = new Set<Promise<void>>();
  private readonly attempt = randomBytes(5).toString('hex');
  private block: Buffer | undefined;
  private filled = 0;
  private failure: unknown;

  constructor(
    private readonly dest: BlockBlobClient,
    options: { blockBytes: number; blocks: number; abortSignal?: AbortSignal },
  ) {
    super();
    this.pool = new BlockPool(options.blocks, options.blockBytes);
    this.abortSignal = options.abortSignal;
  }

  private readonly abortSignal: AbortSignal | undefined;

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.fill(chunk).then(() => callback(), callback);
  }

  override _final(callback: (error?: Error | null) => void): void {
    if (this.block && this.filled > 0) this.stage(this.block, this.filled);
    this.block = undefined;
    Promise.all(this.inFlight).then(
      () => callback(this.failure ? this.stagingError() : null),
      (error: Error) => callback(error),
    );
  }

  /**
   * Commit the staged blocks (after the stream finished); returns the blob's MD5 (base64) and length. With
   * `conditions`, a blob changed by someone else since answers 412/409 (thrown as the storage error, unclassified).
   */
  async commit(options: {
    contentType: string;
    metadata?: Record<string, string>;
    conditions?: { ifMatch?: string; ifNoneMatch?: string };
  }): Promise<{ md5: string; bytes: number }> {
    const md5 = this.hash.digest();
    try {
      await this.dest.commitBlockList(this.ids, {
        ...(options.metadata ? { metadata: options.metadata } : {}),
        blobHTTPHeaders: { blobContentType: options.contentType, blobContentMD5: md5 },
        ...(options.conditions ? { conditions: options.conditions } : {}),
        abortSignal: this.abortSignal,
      });
    } catch (error) {
      if (isStorageCondition(error, 'precondition-failed', 'already-exists', 'conflict')) throw error;
      throw landingContainerMissing(error, this.dest.containerName) ?? classifyStorageError(error, 'commit block list');
    }
    return { md5: md5.toString('base64'), bytes: this.bytes };
  }

  private async fill(chunk: Buffer): Promise<void> {
    if (this.failure) throw this.stagingError();
    this.hash.update(chunk);
    this.bytes += chunk.length;
    for (let offset = 0; offset < chunk.length; ) {
      this.block ??= await this.freeBlock();
      const copied = chunk.copy(this.block, this.filled, offset);
      this.filled += copied;
      offset += copied;
      if (this.filled === this.block.length) {
        this.stage(this.block, this.filled);
        this.block = undefined;
        this.filled = 0;
      }
    }
  }

  private async freeBlock(): Promise<Buffer> {
    for (let free = this.pool.take(); ; free = this.pool.take()) {
      if (free) return free;
      await Promise.race(this.inFlight);
      if (this.failure) throw this.stagingError();
    }
  }

  private stage(buffer: Buffer, length: number): void {
    const id = blockId(this.ids.length, this.attempt);
    this.ids.push(id);
    const bytes = buffer.subarray(0, length);
    // The service checks each block against its MD5 as it arrives: what is committed is what was hashed.
    const staged = this.dest
      .stageBlock(id, bytes, length, {
        abortSignal: this.abortSignal,
        transactionalContentMD5: createHash('md5').update(bytes).digest(),
      })
      .then(() => undefined)
      .catch((error: unknown) => {
        this.failure ??= error;
      })
      .finally(() => {
        this.inFlight.delete(staged);
        this.pool.give(buffer);
      });
    this.inFlight.add(staged);
  }

  private stagingError(): Error {
    return (
      landingContainerMissing(this.failure, this.dest.containerName) ??
      classifyStorageError(this.failure, 'stage block')
    );
  }
}
