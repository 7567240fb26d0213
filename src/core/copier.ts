import { randomBytes } from 'node:crypto';
import {
  BlobClient,
  type BlobGetPropertiesResponse,
  type BlockBlobClient,
  type ContainerClient,
} from '@azure/storage-blob';
import { runBounded } from './concurrency.js';
import type { AppConfig } from './config.js';
import { classifyStorageError, isStorageCondition, landingContainerMissing, MdvmError } from './errors.js';
import { blockId, streamCopy } from './streamCopy.js';

export type CopyMethod = 'copy-from-url' | 'block-from-url' | 'stream' | 'already-landed';

/** Copy tuning, straight from the parsed settings (MDVM_COPY_*, MDVM_STREAM_*, MDVM_COUNT_RECORDS). */
export type CopyOptions = AppConfig['copy'];

export interface CopyRequest {
  readonly sourceUrl: string;
  readonly landingPath: string;
  /** Written on the landed blob; never contains a SAS query. */
  readonly metadata: Record<string, string>;
  readonly abortSignal?: AbortSignal;
  /**
   * Asked before a blob at the landing name that is not a copy of this part is deleted to make room: false when the
   * caller's record says that is no longer safe (the part landed meanwhile, or was bound to another source). Without
   * it the copier replaces such a blob as it finds it.
   */
  readonly mayReplaceForeignBlob?: () => Promise<boolean>;
}

export interface CopyResult {
  readonly method: CopyMethod;
  readonly bytes: number;
  /** Base64 Content-MD5 of the landed blob, when the service or the stream gave one. */
  readonly md5: string | undefined;
  readonly records: number | undefined;
  /**
   * How the landed bytes were checked against the source:
   * - `md5`: an MD5 was checked by someone other than the header we set — computed from the stream by us,
   *   or checked by the service in transit (Copy Blob From URL with x-ms-source-content-md5);
   * - `length`: the length matches; the service's own transport integrity covered the bytes (block path,
   *   or a source without Content-MD5).
   */
  readonly verification: 'md5' | 'length';
}

/** Azure's cap for Copy Blob From URL. A setting above it would make Azure answer 409. */
export const COPY_FROM_URL_MAX_BYTES = 256 * 1024 * 1024;
const MAX_BLOCKS = 50_000;

/**
 * The source is a read-only SAS URL: a 403 from it can only mean the SAS is no longer accepted
 * (a HEAD response carries no error code to say more).
 */
function classifySourceError(error: unknown): MdvmError {
  const classified = classifyStorageError(error, 'read source properties');
  if (classified.kind === 'forbidden') {
    return new MdvmError('expired', `${classified.message} (the source refused the SAS: expired or revoked)`, {
      cause: error,
      statusCode: 403,
    });
  }
  return classified;
}

function sourceChanged(cause?: unknown): MdvmError {
  return new MdvmError('transient', 'the source changed during the copy (its ETag moved); the retry reads it again', {
    ...(cause === undefined ? {} : { cause }),
    statusCode: 412,
  });
}

function md5Of(props: { contentMD5?: Uint8Array | undefined }): string | undefined {
  return props.contentMD5 && props.contentMD5.length > 0 ? Buffer.from(props.contentMD5).toString('base64') : undefined;
}

/**
 * Copies one part into the landing container and verifies it. Writes are create-only
 * (If-None-Match: *), so a duplicate delivery can never create the same blob twice, and a
 * blob that is already there and matches the source counts as landed.
 */
export class PartCopier {
  constructor(
    private readonly landing: ContainerClient,
    private readonly options: CopyOptions,
  ) {}

  async copy(request: CopyRequest): Promise<CopyResult> {
    const source = new BlobClient(request.sourceUrl);
    const sourceProps = await this.sourceProperties(source, request.abortSignal);
    const size = sourceProps.contentLength ?? 0;
    const sourceMd5 = md5Of(sourceProps);
    const dest = this.landing.getBlockBlobClient(request.landingPath);

    const alreadyLanded = (existing: BlobGetPropertiesResponse): CopyResult => ({
      method: 'already-landed',
      bytes: size,
      md5: md5Of(existing) ?? sourceMd5,
      records: undefined,
      verification: sourceMd5 !== undefined && md5Of(existing) === sourceMd5 ? 'md5' : 'length',
    });

    let method: CopyMethod = 'copy-from-url';
    let streamed: Awaited<ReturnType<typeof streamCopy>> | undefined;
    /** Set when Copy Blob From URL copied exactly the source version we read (pinned by its ETag). */
    let pinnedCopy: { md5: string | undefined } | undefined;
    /** The ETag of the blob this attempt wrote. */
    const written: { etag: string | undefined } = { etag: undefined };
    const write = async (createOnly: boolean): Promise<void> => {
      const conditions = createOnly ? { ifNoneMatch: '*' } : {};
      if (this.options.mode === 'stream') {
        method = 'stream';
        streamed = await streamCopy(source, dest, sourceProps, request, conditions, this.options);
        written.etag = streamed.etag;
      } else if (size <= Math.min(this.options.singleShotMaxBytes, COPY_FROM_URL_MAX_BYTES)) {
        method = 'copy-from-url';
        // Pinned to the ETag we read the size and MD5 from: a source replaced since is refused (412), so what lands
        // is the version we describe, and the copy's response is all the check the landed blob needs.
        const response = await dest.syncCopyFromURL(request.sourceUrl, {
          metadata: request.metadata,
          conditions,
          ...(sourceProps.etag ? { sourceConditions: { ifMatch: sourceProps.etag } } : {}),
          ...(sourceProps.contentMD5 ? { sourceContentMD5: sourceProps.contentMD5 } : {}),
          abortSignal: request.abortSignal,
        });
        pinnedCopy = sourceProps.etag ? { md5: md5Of(response) } : undefined;
        written.etag = response.etag;
      } else {
        method = 'block-from-url';
        written.etag = await this.copyByBlocks(source, dest, size, sourceProps, request, conditions);
      }
    };
    // The write is create-only, so the normal case costs no look at the destination first; only a name that is
    // taken is looked at.
    try {
      for (let attempt = 1; ; attempt++) {
        try {
          await write(true);
          break;
        } catch (error) {
          if (!isStorageCondition(error, 'already-exists')) throw error;
          const existing = await this.destinationProperties(dest, request.abortSignal);
          if (!existing) {
            // Nothing committed there: a blob another delivery has just deleted, or only uncommitted blocks of a
            // crashed attempt (Azurite refuses a create-only write over those). Create-only once more first, so a
            // copy another delivery commits meanwhile is never overwritten; then write over the blocks.
            if (attempt === 1) continue;
            if (!(await this.holdsUncommittedBlocks(dest, request.abortSignal))) {
              throw new MdvmError(
                'transient',
                `${request.landingPath} keeps changing under this copy; the retry looks again`,
                {
                  cause: error,
                },
              );
            }
            await write(false);
            break;
          }
          if (this.isCopyOfThisPart(existing, request.metadata)) {
            // Our own earlier or concurrent copy of this very part: it counts as landed.
            if (this.matchesSource(existing, size, sourceMd5)) return alreadyLanded(existing);
            // A whole copy of another version of this part (the source changed since it was copied). It may be the
            // landed blob of a delivery that is about to record it, so it is never deleted here: this delivery fails
            // and its retry finds the part landed, or the part fails with this reason for an operator to decide.
            throw new MdvmError(
              'transient',
              `${request.landingPath} holds a copy of this part from before its source changed (${existing.contentLength} bytes, md5 ${md5Of(existing) ?? 'n/a'}; the source now has ${size} bytes, md5 ${sourceMd5 ?? 'n/a'}); it is kept. If no other delivery lands the part, delete that blob and requeue`,
              { cause: error },
            );
          }
          // Other bytes under this name (no copy of this part) are a leftover to replace, once, and only that blob.
          if (attempt > 1) {
            throw new MdvmError('transient', `${request.landingPath} is taken by a blob that is not this part`, {
              cause: error,
            });
          }
          if (request.mayReplaceForeignBlob && !(await request.mayReplaceForeignBlob())) {
            throw new MdvmError(
              'transient',
              `${request.landingPath} is taken by a blob that is not this copy of the part, and the part's record changed meanwhile (landed, or bound to another source): nothing replaced`,
              { cause: error },
            );
          }
          await this.deleteExactly(dest, existing.etag, request.abortSignal);
        }
      }
    } catch (error) {
      throw await this.classifyCopyFailure(error, source, request.abortSignal);
    }

    const landed = pinnedCopy
      ? { contentLength: size, contentMD5: undefined }
      : await this.destinationProperties(dest, request.abortSignal);
    const landedMd5 = pinnedCopy ? pinnedCopy.md5 : landed ? md5Of(landed) : undefined;
    const expectedMd5 = sourceMd5 ?? streamed?.md5;
    const ok =
      landed !== undefined &&
      landed.contentLength === size &&
      (streamed === undefined || streamed.bytes === size) &&
      (expectedMd5 === undefined || landedMd5 === undefined || landedMd5 === expectedMd5);
    if (!ok) {
      // Only the blob this attempt wrote: whatever another delivery has put there since is its to judge.
      await this.deleteExactly(dest, written.etag);
      throw new MdvmError(
        'transient',
        `verification failed for ${request.landingPath}: landed ${landed?.contentLength ?? 'nothing'} bytes (md5 ${landedMd5 ?? 'n/a'}), source has ${size} bytes (md5 ${expectedMd5 ?? 'n/a'})`,
      );
    }
    const verification =
      streamed !== undefined || (method === 'copy-from-url' && sourceMd5 !== undefined) ? 'md5' : 'length';
    return { method, bytes: size, md5: landedMd5 ?? expectedMd5, records: streamed?.records, verification };
  }

  /** Our own copy of this very part: the same generatedTime and source path in its metadata. */
  private isCopyOfThisPart(props: BlobGetPropertiesResponse, metadata: Record<string, string>): boolean {
    return ['mdvm_generated_time', 'mdvm_source_path'].every((key) => props.metadata?.[key] === metadata[key]);
  }

  /** An existing copy of this part counts as landed only if its length and MD5 agree with the source now. */
  private matchesSource(props: BlobGetPropertiesResponse, size: number, sourceMd5: string | undefined): boolean {
    if (props.contentLength !== size) return false;
    const md5 = md5Of(props);
    return sourceMd5 === undefined || md5 === undefined || md5 === sourceMd5;
  }

  /** Whether only uncommitted blocks (a crashed attempt's) hold the name: then nothing committed can be overwritten. */
  private async holdsUncommittedBlocks(dest: BlockBlobClient, abortSignal?: AbortSignal): Promise<boolean> {
    try {
      const list = await dest.getBlockList('uncommitted', { abortSignal });
      return (list.uncommittedBlocks?.length ?? 0) > 0;
    } catch (error) {
      if (isStorageCondition(error, 'not-found')) return false;
      throw classifyStorageError(error, 'list uncommitted blocks');
    }
  }

  /** Deletes the blob only if it is still the version we looked at (its ETag): never one written since. */
  private async deleteExactly(dest: BlockBlobClient, etag: string | undefined, abortSignal?: AbortSignal) {
    try {
      await dest.deleteIfExists({ ...(etag ? { conditions: { ifMatch: etag } } : {}), abortSignal });
    } catch (error) {
      if (!isStorageCondition(error, 'precondition-failed')) throw error;
    }
  }

  private async sourceProperties(source: BlobClient, abortSignal?: AbortSignal): Promise<BlobGetPropertiesResponse> {
    try {
      return await source.getProperties({ abortSignal });
    } catch (error) {
      throw classifySourceError(error);
    }
  }

  private async destinationProperties(
    dest: BlockBlobClient,
    abortSignal?: AbortSignal,
  ): Promise<BlobGetPropertiesResponse | undefined> {
    try {
      return await dest.getProperties({ abortSignal });
    } catch (error) {
      if (isStorageCondition(error, 'not-found')) return undefined;
      throw classifyStorageError(error, 'read landed blob properties');
    }
  }

  /**
   * The service reports an unreadable copy source as 403 CannotVerifyCopySource whether the SAS
   * expired or the blob is gone; asking the source directly tells the two apart.
   */
  private async classifyCopyFailure(error: unknown, source: BlobClient, abortSignal?: AbortSignal): Promise<MdvmError> {
    if (isStorageCondition(error, 'precondition-failed')) {
      // Only the source carries a precondition on a copy (the landing side is create-only: 409, not 412).
      return sourceChanged(error);
    }
    const landingGone = landingContainerMissing(error, this.landing.containerName);
    if (landingGone) return landingGone;
    const classified = classifyStorageError(error, 'copy from source');
    if (classified.kind !== 'expired') return classified;
    try {
      await source.getProperties({ abortSignal });
      // The source reads fine with this SAS: the 403 came from the landing side (role, firewall, token).
      return new MdvmError('forbidden', `${classified.message} (the source is readable: the landing account refused)`, {
        cause: error,
        statusCode: 403,
      });
    } catch (probe) {
      const probed = classifySourceError(probe);
      return probed.kind === 'not-found' || probed.kind === 'expired' ? probed : classified;
    }
  }

  /** Put Block From URL in parallel, then Put Block List: the service moves the bytes. */
  private async copyByBlocks(
    source: BlobClient,
    dest: BlockBlobClient,
    size: number,
    sourceProps: BlobGetPropertiesResponse,
    request: CopyRequest,
    conditions: { ifNoneMatch?: string },
  ): Promise<string | undefined> {
    const blockSize = Math.max(this.options.blockSizeBytes, Math.ceil(size / MAX_BLOCKS));
    const count = Math.max(1, Math.ceil(size / blockSize));
    // Block ids of this attempt only: a concurrent delivery of the same part stages its own, so a late block of one
    // attempt can never land in the list another commits (uncommitted blocks with the same id are last-writer-wins).
    const attempt = randomBytes(5).toString('hex');
    const ids = Array.from({ length: count }, (_, i) => blockId(i, attempt));
    await runBounded(ids, this.options.blockConcurrency, async (id, i) => {
      const offset = i * blockSize;
      await dest.stageBlockFromURL(id, request.sourceUrl, offset, Math.min(blockSize, size - offset), {
        abortSignal: request.abortSignal,
      });
    });
    // Put Block From URL cannot be pinned to the source's ETag through the SDK: check it once all blocks are read.
    // The same ETag before and after means no write in between (every write moves it), so the blocks are one
    // version's; a moved ETag may mean a splice of two, and nothing is committed.
    const after = await this.sourceProperties(source, request.abortSignal);
    if (after.etag !== sourceProps.etag) throw sourceChanged();
    const committed = await dest.commitBlockList(ids, {
      metadata: request.metadata,
      blobHTTPHeaders: {
        ...(sourceProps.contentType ? { blobContentType: sourceProps.contentType } : {}),
        ...(sourceProps.contentMD5 ? { blobContentMD5: sourceProps.contentMD5 } : {}),
      },
      conditions,
      abortSignal: request.abortSignal,
    });
    return committed.etag;
  }
}
