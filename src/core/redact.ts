/**
 * SAS URLs and bearer tokens are credentials. Everything that leaves the process as text
 * (logs, errors, table rows, telemetry, dead letters) goes through `redact`.
 */
const URL_QUERY = /(\bhttps?:\/\/[^\s"'<>?]+)\?[^\s"'<>]*/gi;
const SIG_PARAM = /([?&;\s"']|^)(sig|signature|se?ssion_?token|code)=([^&\s"']+)/gi;
const BEARER = /\b(Bearer)\s+[A-Za-z0-9._~+/=-]+/gi;
const ACCOUNT_KEY = /\b(AccountKey|SharedAccessSignature)=([^;\s"']+)/gi;
const ACCESS_TOKEN_JSON = /("access_token"\s*:\s*")[^"]+(")/gi;

export const REDACTED = '<redacted>';

export function redact(text: string): string {
  return text
    .replace(URL_QUERY, `$1?${REDACTED}`)
    .replace(SIG_PARAM, `$1$2=${REDACTED}`)
    .replace(BEARER, `$1 ${REDACTED}`)
    .replace(ACCOUNT_KEY, `$1=${REDACTED}`)
    .replace(ACCESS_TOKEN_JSON, `$1${REDACTED}$2`);
}

/** Whether a text carries something `redact` treats as a credential other than a plain URL query (a SAS signature, a token, a key). */
export function carriesCredential(text: string): boolean {
  return [SIG_PARAM, BEARER, ACCOUNT_KEY, ACCESS_TOKEN_JSON].some((pattern) =>
    new RegExp(pattern.source, 'i').test(text),
  );
}

/** The URL without its query string: what we log and store instead of a SAS URL. */
export function stripQuery(url: string): string {
  const at = url.indexOf('?');
  return at === -1 ? url : url.slice(0, at);
}
