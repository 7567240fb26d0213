/**
 * SAS URLs and bearer tokens are credentials. Everything that leaves the process as text
 * (logs, errors, table rows, telemetry, dead letters) goes through `redact`.
 */
const URL_QUERY = /(\bhttps?:\/\/[^\s"'<>?]+)\?[^\s"'<>]*/gi;
const SIG_PARAM =
  /([?&;\s"']|^)(sig|signature|se?ssion_?token|code|access_token|id_token|refresh_token|client_secret|api[-_]?key|token)=([^&\s"']+)/gi;
const BEARER = /\b(Bearer)\s+[A-Za-z0-9._~+/=-]+/gi;
const ACCOUNT_KEY = /\b(AccountKey|SharedAccessSignature)=([^;\s"']+)/gi;
const ACCESS_TOKEN_JSON = /("access_token"\s*:\s*")[^"]+(")/gi;
/** `user:password@` in a URL (a setting pasted with credentials in it). */
const URL_USER_INFO = /(\b[a-z][a-z0-9+.-]{0,31}:\/\/)[^/\s@"'<>]+@/gi;
/** A signature inside a URL-encoded query (`sig%3D…`), e.g. a SAS URL quoted as a parameter of another URL. */
const ENCODED_SIG_PARAM = /(?<![a-z])(sig|signature)%3D([^&\s"'%]|%(?!26)[0-9a-f]{2})+/gi;

export const REDACTED = '<redacted>';

export function redact(text: string): string {
  return text
    .replace(URL_QUERY, `$1?${REDACTED}`)
    .replace(SIG_PARAM, `$1$2=${REDACTED}`)
    .replace(BEARER, `$1 ${REDACTED}`)
    .replace(ACCOUNT_KEY, `$1=${REDACTED}`)
    .replace(ACCESS_TOKEN_JSON, `$1${REDACTED}$2`)
    .replace(URL_USER_INFO, `$1${REDACTED}@`)
    .replace(ENCODED_SIG_PARAM, `$1%3D${REDACTED}`);
}

/** Whether a text carries something `redact` treats as a credential other than a plain URL query (a SAS signature, a token, a key). */
export function carriesCredential(text: string): boolean {
  return [SIG_PARAM, BEARER, ACCOUNT_KEY, ACCESS_TOKEN_JSON, URL_USER_INFO, ENCODED_SIG_PARAM].some((pattern) =>
    new RegExp(pattern.source, 'i').test(text),
  );
}

/** The URL without its query string: what we log and store instead of a SAS URL. */
export function stripQuery(url: string): string {
  const at = url.indexOf('?');
  return at === -1 ? url : url.slice(0, at);
}
