import { Transform, type TransformCallback } from 'node:stream';
import { MdvmError } from './errors.js';

/**
 * One page of a Defender JSON response (`{"@odata.context": …, "value": [ {record}, … ], "@odata.nextLink": …}`)
 * turned into JSON Lines as the bytes arrive: each element of `value` leaves as one line, with the insignificant
 * whitespace removed and every value byte for byte as sent. A page of 200,000 records never exists as objects or as
 * one string: memory is one record plus the output chunk. `nextLink` and `context` are known once the page ends.
 */
export class ODataRecordsTransform extends Transform {
  /** `@odata.nextLink` of the page, when it had one (known after the stream ends). */
  nextLink: string | undefined;
  /** `@odata.context` of the page. */
  context: string | undefined;
  /** Records emitted so far. */
  records = 0;

  private depth = 0;
  /** The opening bracket at each depth (index = depth), so `{…]` is refused. */
  private readonly openers: number[] = [];
  /** Whether the page's top-level `value` array was opened and closed: a page without one is not a page. */
  private valueArrays = 0;
  private inString = false;
  private escaped = false;
  private started = false;
  private ended = false;
  /** In the top-level object: the last string seen there (a key until a ':' follows). */
  private topString: number[] | undefined;
  private topKey: string | undefined;
  private awaitingTopValue = false;
  private collectingTopValue = false;
  private inValueArray = false;
  private capturing = false;
  private record: Buffer;
  private recordLength = 0;
  private out: Buffer;
  private outLength = 0;

  constructor(
    private readonly options: {
      maxRecordBytes?: number;
      outputChunkBytes?: number;
      what?: string;
      /** Sees each record's compact bytes (valid only during the call), e.g. to find its EventTimestamp. */
      onRecord?: (record: Buffer) => void;
    } = {},
  ) {
    super();
    this.record = Buffer.allocUnsafe(64 * 1024);
    this.out = Buffer.allocUnsafe(options.outputChunkBytes ?? 256 * 1024);
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    try {
      this.scan(chunk);
      callback();
    } catch (error) {
      callback(error as Error);
    }
  }

  override _flush(callback: TransformCallback): void {
    if (!this.ended) {
      callback(this.malformed(this.started ? 'the response ended before its JSON did (truncated)' : 'empty response'));
      return;
    }
    if (this.valueArrays !== 1) {
      // `{"error": …}`, `{"value": null}` or two `value` arrays: not a page, and never an empty last one.
      callback(
        this.malformed(`the page has ${this.valueArrays === 0 ? 'no' : 'more than one'} top-level "value" array`),
      );
      return;
    }
    if (this.outLength > 0) this.push(Buffer.from(this.out.subarray(0, this.outLength)));
    this.outLength = 0;
    callback();
  }

  private malformed(why: string): MdvmError {
    return new MdvmError('invalid-input', `${this.options.what ?? 'Defender JSON page'}: ${why}`);
  }

  private scan(chunk: Buffer): void {
    for (let i = 0; i < chunk.length; i++) {
      const c = chunk[i] as number;
      if (this.inString) {
        // JSON strings carry no raw control characters; one here (a raw newline) would also split a JSON line.
        if (c < 0x20) throw this.malformed('a control character inside a string');
        if (this.capturing) this.keep(c);
        else if (this.topString) {
          if (this.topString.length >= 64 * 1024) throw this.malformed('a top-level string is longer than 64 KiB');
          this.topString.push(c);
        }
        if (this.escaped) this.escaped = false;
        else if (c === 0x5c) this.escaped = true;
        else if (c === 0x22) {
          this.inString = false;
          if (!this.capturing && this.topString) this.topStringEnded();
        }
        continue;
      }
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) continue;
      if (this.ended) throw this.malformed('content after the end of the JSON object');
      if (!this.started) {
        if (c !== 0x7b) throw this.malformed('the response is not a JSON object');
        this.started = true;
        this.depth = 1;
        this.openers[1] = c;
        continue;
      }
      if (this.capturing) this.keep(c);
      switch (c) {
        case 0x22: // "
          this.inString = true;
          this.escaped = false;
          if (!this.capturing && this.depth === 1) {
            // After a ':' the string is the key's value; otherwise it is the next key.
            if (this.awaitingTopValue) this.collectingTopValue = true;
            this.topString = [0x22];
          } else if (!this.capturing && this.depth === 2 && this.inValueArray) {
            throw this.malformed('an element of "value" is not an object');
          }
          break;
        case 0x7b: // {
        case 0x5b: // [
          this.depth++;
          if (this.depth > 256) throw this.malformed('nested deeper than 256 levels');
          this.openers[this.depth] = c;
          if (this.depth === 2 && this.awaitingTopValue && this.topKey === 'value') {
            if (c !== 0x5b) throw this.malformed('"value" is not an array');
            this.inValueArray = true;
          } else if (this.depth === 3 && this.inValueArray && !this.capturing) {
            if (c !== 0x7b) throw this.malformed('an element of "value" is not an object');
            this.capturing = true;
            this.recordLength = 0;
            this.keep(c);
          }
          this.awaitingTopValue = false;
          break;
        case 0x7d: // }
        case 0x5d: // ]
          if (this.depth === 0 || this.openers[this.depth] !== (c === 0x7d ? 0x7b : 0x5b)) {
            throw this.malformed('unbalanced brackets');
          }
          this.depth--;
          if (this.capturing && this.depth === 2) this.emitRecord();
          if (this.depth === 1 && this.inValueArray) {
            this.inValueArray = false;
            this.valueArrays++;
          }
          if (this.depth === 0) {
            if (c !== 0x7d) throw this.malformed('unbalanced brackets');
            this.ended = true;
          }
          break;
        case 0x3a: // :
          if (this.depth === 1) {
            if (this.topKey === undefined) throw this.malformed('a value without a key');
            this.awaitingTopValue = true;
          }
          break;
        case 0x2c: // ,
          if (this.depth === 1) {
            this.topKey = undefined;
            this.awaitingTopValue = false;
          }
          break;
        default:
          if (this.depth === 2 && this.inValueArray && !this.capturing) {
            throw this.malformed('an element of "value" is not an object');
          }
          if (this.depth === 1) this.awaitingTopValue = false;
      }
    }
  }

  private topStringEnded(): void {
    const text = Buffer.from(this.topString ?? []).toString('utf8');
    this.topString = undefined;
    let value: string;
    try {
      value = JSON.parse(text) as string;
    } catch {
      throw this.malformed('a top-level string is not valid JSON');
    }
    if (this.collectingTopValue) {
      this.collectingTopValue = false;
      this.awaitingTopValue = false;
      if (this.topKey === '@odata.nextLink') this.nextLink = value;
      else if (this.topKey === '@odata.context') this.context = value;
    } else {
      this.topKey = value;
    }
  }

  private keep(c: number): void {
    if (this.recordLength === this.record.length) {
      const limit = this.options.maxRecordBytes ?? 8 * 1024 * 1024;
      if (this.record.length >= limit) throw this.malformed(`a record is larger than ${limit} bytes`);
      const bigger = Buffer.allocUnsafe(Math.min(limit, this.record.length * 2));
      this.record.copy(bigger, 0, 0, this.recordLength);
      this.record = bigger;
    }
    this.record[this.recordLength++] = c;
  }

  private emitRecord(): void {
    this.capturing = false;
    this.records++;
    this.options.onRecord?.(this.record.subarray(0, this.recordLength));
    this.write_(this.record, this.recordLength);
    this.write_(NEWLINE, 1);
    // A record that grew the buffer far beyond the usual size gives the memory back.
    if (this.record.length > 1024 * 1024) this.record = Buffer.allocUnsafe(64 * 1024);
  }

  private write_(bytes: Buffer, length: number): void {
    for (let offset = 0; offset < length; ) {
      const copied = bytes.copy(this.out, this.outLength, offset, length);
      this.outLength += copied;
      offset += copied;
      if (this.outLength === this.out.length) {
        this.push(this.out);
        this.out = Buffer.allocUnsafe(this.out.length);
        this.outLength = 0;
      }
    }
  }
}

const NEWLINE = Buffer.from('\n');
