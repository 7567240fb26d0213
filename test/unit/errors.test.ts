import { describe, expect, it } from 'vitest';
import { classifyStorageError, errorMessage, isStorageCondition, storageCondition } from '../../src/core/errors.js';

/** What the storage SDKs throw: a RestError with the HTTP status and the service's error code. */
const restError = (statusCode: number | undefined, code?: string) =>
  Object.assign(new Error(`${statusCode} ${code ?? ''}`), { statusCode, code, name: 'RestError' });

describe('storage conditions are named once', () => {
  it.each([
    [restError(404, 'BlobNotFound'), 'not-found'],
    [restError(404, 'ResourceNotFound'), 'not-found'],
    [restError(409, 'BlobAlreadyExists'), 'already-exists'],
    [restError(409, 'EntityAlreadyExists'), 'already-exists'],
    [restError(412, 'ConditionNotMet'), 'precondition-failed'],
    [restError(409, 'LeaseIdMissing'), 'conflict'],
    [restError(403, 'AuthorizationPermissionMismatch'), 'forbidden'],
    [restError(400, 'PopReceiptMismatch'), 'bad-request'],
    [restError(500, 'InternalError'), undefined],
    [new Error('socket hang up'), undefined],
  ])('%s is %s', (error, condition) => {
    expect(storageCondition(error)).toBe(condition);
  });

  it('isStorageCondition matches any of the conditions given', () => {
    expect(isStorageCondition(restError(409, 'BlobAlreadyExists'), 'not-found', 'already-exists')).toBe(true);
    expect(isStorageCondition(restError(412), 'already-exists', 'conflict')).toBe(false);
    expect(isStorageCondition(undefined, 'not-found')).toBe(false);
  });

  it('forbidden is not retryable in a backoff loop; expired SAS and transient failures are classified apart', () => {
    expect(classifyStorageError(restError(403, 'AuthorizationPermissionMismatch'), 'write')).toMatchObject({
      kind: 'forbidden',
      retryable: false,
    });
    expect(classifyStorageError(restError(403, 'AuthenticationFailed'), 'read').kind).toBe('expired');
    expect(classifyStorageError(restError(503, 'ServerBusy'), 'write')).toMatchObject({ retryable: true });
  });
});

describe('an error is never printed as nothing', () => {
  it('names an error without a message by its name, code and status (the SDK throws these for unreadable answers)', () => {
    expect(errorMessage(Object.assign(new Error(''), { name: 'RestError', statusCode: 500 }))).toBe(
      'RestError without a message (HTTP 500)',
    );
    expect(errorMessage(Object.assign(new Error(' '), { name: 'RestError', code: 'PARSE_ERROR' }))).toBe(
      'RestError without a message (PARSE_ERROR)',
    );
    expect(errorMessage(new Error('', { cause: new Error('socket hang up') }))).toBe(
      'Error without a message: socket hang up',
    );
    expect(errorMessage(new Error('boom'))).toBe('boom');
  });
});

describe('which page links may carry the Defender token', () => {
  it('the configured origin and documented Defender API hosts over https, nothing else', async () => {
    const { sameApi } = await import('../../src/core/defenderClient.js');
    const api = new URL('https://api.security.microsoft.com');
    for (const ok of [
      'https://api.security.microsoft.com/api/machines/X?$skiptoken=a',
      'https://eu.api.security.microsoft.com/api/machines/X',
      'https://api.securitycenter.microsoft.com/api/machines/X',
      'https://api-us.securitycenter.microsoft.com/api/machines/X',
      'https://api-gcc.securitycenter.microsoft.us/api/machines/X',
    ]) {
      expect(sameApi(new URL(ok), api), ok).toBe(true);
    }
    for (const bad of [
      'http://api.security.microsoft.com/api/machines/X',
      'https://api.security.microsoft.com:8443/api/machines/X',
      'https://api.security.microsoft.com.evil.example/api',
      'https://evil.example/api.security.microsoft.com',
      'https://user@evil.example/api',
      'https://xapi.security.microsoft.com/api',
      'https://wpatdadi-eus-stg.cloudapp.net/api/machines/X',
    ]) {
      expect(sameApi(new URL(bad), api), bad).toBe(false);
    }
    expect(sameApi(new URL('http://127.0.0.1:4000/api/x'), new URL('http://127.0.0.1:4000'))).toBe(true);
    expect(sameApi(new URL('http://127.0.0.1:4001/api/x'), new URL('http://127.0.0.1:4000'))).toBe(false);
  });
});
