#!/usr/bin/env bash
# Grants the WindowsDefenderATP application roles the app needs to its managed identity, through Microsoft Graph.
# Run by azd as the postprovision hook, or by hand by a directory admin. `--help` explains the rest.
set -euo pipefail

readonly DEFENDER_APP_ID='fc780465-2017-40d4-a0c5-307022471b92'
readonly ROLES=(Vulnerability.Read.All Software.Read.All SecurityBaselinesAssessment.Read.All)
readonly PRINCIPAL_VAR='AZURE_MANAGED_IDENTITY_PRINCIPAL_ID'

# AZ / AZD: the commands to run (tests point them at fakes).
AZ="${AZ:-az}"
AZD="${AZD:-azd}"
GRAPH="${GRAPH_ENDPOINT:-https://graph.microsoft.com}"
GRAPH="${GRAPH%/}"
# A managed identity created a moment ago can take a while to show up in Graph.
LOOKUP_ATTEMPTS="${GRANT_LOOKUP_ATTEMPTS:-6}"
RETRY_DELAY="${GRANT_RETRY_DELAY_SECONDS:-10}"

script_name="$(basename "$0")"

usage() {
  cat <<EOF
Usage: ${script_name} [--dry-run] [PRINCIPAL_ID]

Grants the WindowsDefenderATP (Microsoft Defender for Endpoint API) application permissions
  ${ROLES[*]}
to the service principal of the Function App's managed identity, as app role assignments made through
Microsoft Graph. Managed identities do not appear in the portal's "API permissions" blade, so this is how
they get application permissions. Roles already granted are skipped, so running it again is safe.

Arguments:
  PRINCIPAL_ID   principal (object) id of the managed identity, not its client id. Default: the
                 environment variable ${PRINCIPAL_VAR} (azd passes its outputs to hooks), then
                 \`azd env get-value ${PRINCIPAL_VAR}\` when azd is installed.

Options:
  --dry-run      look everything up and print what would be granted; grant nothing
  -h, --help     show this help

Requirements:
  - Azure CLI signed in (\`az login\`) to the tenant of the subscription you deployed to. azd's own sign-in
    (\`azd auth login\`) is separate; the az CLI needs its own.
  - The signed-in account must be able to grant app role assignments: Privileged Role Administrator,
    Cloud Application Administrator, Application Administrator or Global Administrator, or an identity
    with the Graph permission AppRoleAssignment.ReadWrite.All.
  - The tenant must have Microsoft Defender for Endpoint (the WindowsDefenderATP service principal,
    app id ${DEFENDER_APP_ID}).

Environment:
  GRAPH_ENDPOINT              Microsoft Graph endpoint (default https://graph.microsoft.com). GCC High and
                              DoD: https://graph.microsoft.us, after \`az cloud set --name AzureUSGovernment\`
                              and \`az login\`.
  AZ                          Azure CLI command to run (default az).
  GRANT_LOOKUP_ATTEMPTS       lookups of a newly created identity before giving up (default 6).
  GRANT_RETRY_DELAY_SECONDS   wait between those lookups (default 10).
EOF
}

die() {
  echo "${script_name}: error: $*" >&2
  exit 1
}

# Anything az prints on failure is shown through this, in case it ever carries a token.
scrub() {
  sed -E \
    -e 's#([Bb]earer)[[:space:]]+[A-Za-z0-9._~+/=-]+#\1 <redacted>#g' \
    -e 's#eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*#<redacted>#g' \
    -e 's#("?(access_token|accessToken|refresh_token)"?[[:space:]]*[:=][[:space:]]*"?)[^",[:space:]]+#\1<redacted>#g'
}

dry_run=false
principal_id=''
while (($# > 0)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) dry_run=true ;;
    --)
      shift
      break
      ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *)
      [[ -z "$principal_id" ]] || die "more than one principal id given (see --help)"
      principal_id="$1"
      ;;
  esac
  shift
done
if (($# > 0)); then
  [[ -z "$principal_id" && $# -eq 1 ]] || die "more than one principal id given (see --help)"
  principal_id="$1"
fi

command -v "$AZ" >/dev/null 2>&1 ||
  die "the Azure CLI ('$AZ') is not installed or not on PATH: https://learn.microsoft.com/cli/azure/install-azure-cli"

# --- the principal id -------------------------------------------------------------------------------------
source_of_id='argument'
if [[ -z "$principal_id" && -n "${AZURE_MANAGED_IDENTITY_PRINCIPAL_ID:-}" ]]; then
  principal_id="$AZURE_MANAGED_IDENTITY_PRINCIPAL_ID"
  source_of_id="environment variable ${PRINCIPAL_VAR}"
fi
if [[ -z "$principal_id" ]] && command -v "$AZD" >/dev/null 2>&1; then
  if value="$("$AZD" env get-value "$PRINCIPAL_VAR" 2>/dev/null </dev/null)"; then
    principal_id="$(printf '%s' "$value" | tr -d '\r\n')"
    source_of_id="azd env get-value ${PRINCIPAL_VAR}"
  fi
fi
if [[ -z "$principal_id" ]]; then
  die "no managed identity principal id. Pass it as the first argument, set ${PRINCIPAL_VAR}, or run this
from the azd project after \`azd provision\` (azd env get-value ${PRINCIPAL_VAR}). It is the identity's
principal (object) id: az identity show -g <resource-group> -n <identity-name> --query principalId -o tsv"
fi
principal_id="$(printf '%s' "$principal_id" | tr '[:upper:]' '[:lower:]')"
[[ "$principal_id" =~ ^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$ ]] ||
  die "'$principal_id' (from the ${source_of_id}) is not a GUID; expected the managed identity's principal (object) id"

# --- az helpers -------------------------------------------------------------------------------------------
tmp_dir="$(mktemp -d)"
trap 'rm -rf "$tmp_dir"' EXIT
out_file="$tmp_dir/stdout"
err_file="$tmp_dir/stderr"

insufficient_privileges() {
  die "Microsoft Graph refused: insufficient privileges ($1).
Granting application permissions (app role assignments) needs a directory role: Privileged Role
Administrator, Cloud Application Administrator, Application Administrator or Global Administrator, or an
identity with the Graph permission AppRoleAssignment.ReadWrite.All. Ask an admin to run:
  $0 ${principal_id}"
}

# graph_call WHAT ARGS...: az rest against Graph, output in $out_file (read it with graph_out). Stops the
# script on the failures every call shares (sign-in, privileges); for any other failure returns 1 with az's
# stderr in $err_file.
graph_call() {
  local what="$1"
  shift
  if "$AZ" rest --only-show-errors "$@" >"$out_file" 2>"$err_file"; then
    return 0
  fi
  local err
  err="$(scrub <"$err_file")"
  if grep -qiE "az login|AADSTS(50076|50078|50079|700082|70043|50173)|token.*(expired|invalid)|Unauthorized" <<<"$err"; then
    die "Azure CLI sign-in is missing or expired, or not for this cloud (while ${what}). Run \`az login\`
(for GCC High/DoD first \`az cloud set --name AzureUSGovernment\` and set GRAPH_ENDPOINT=https://graph.microsoft.us).
az said: ${err}"
  fi
  if grep -qiE "Forbidden|Authorization_RequestDenied|Insufficient privileges" <<<"$err"; then
    insufficient_privileges "while ${what}"
  fi
  return 1
}

graph_out() {
  tr -d '\r' <"$out_file"
}

# --- signed in? -------------------------------------------------------------------------------------------
if ! tenant_id="$("$AZ" account show --only-show-errors --query tenantId -o tsv 2>"$err_file")"; then
  die "not signed in to the Azure CLI. Run \`az login\` (the tenant of your deployment), then run this again.
az said: $(scrub <"$err_file")"
fi
tenant_id="$(printf '%s' "$tenant_id" | tr -d '\r\n')"
echo "Tenant: ${tenant_id}; Graph: ${GRAPH}"
$dry_run && echo "Dry run: nothing will be granted."

# --- WindowsDefenderATP service principal and its app roles -----------------------------------------------
defender_url="${GRAPH}/v1.0/servicePrincipals?\$filter=appId%20eq%20'${DEFENDER_APP_ID}'&\$select=id,appId,displayName,appRoles"
graph_call 'looking up the WindowsDefenderATP service principal' \
  --method GET --url "$defender_url" --query 'value[0].id' -o tsv ||
  die "could not look up the WindowsDefenderATP service principal: $(scrub <"$err_file")"
defender_sp_id="$(graph_out | tr -d '\n')"
if [[ -z "$defender_sp_id" ]]; then
  die "the WindowsDefenderATP service principal (app id ${DEFENDER_APP_ID}) is not in tenant ${tenant_id}.
This tenant does not seem to have Microsoft Defender for Endpoint (or Defender Vulnerability Management):
the API exists in a tenant only once Defender for Endpoint has been set up there. Check that az is signed
in to the right tenant (az account show), and that GRAPH_ENDPOINT matches your cloud."
fi

graph_call 'reading the WindowsDefenderATP app roles' \
  --method GET --url "$defender_url" --query 'value[0].appRoles[].[value, id]' -o tsv ||
  die "could not read the WindowsDefenderATP app roles: $(scrub <"$err_file")"
role_rows="$(graph_out)"
# role_id_of VALUE: the app role id for a permission name (bash 3.2 on macOS has no associative arrays).
role_id_of() {
  awk -F '\t' -v role="$1" '$1 == role { print $2; exit }' <<<"$role_rows"
}
for role in "${ROLES[@]}"; do
  [[ -n "$(role_id_of "$role")" ]] ||
    die "the WindowsDefenderATP service principal (${defender_sp_id}) has no application permission '${role}'"
done

# --- the managed identity's service principal --------------------------------------------------------------
for ((attempt = 1; ; attempt++)); do
  if graph_call 'looking up the managed identity' \
    --method GET --url "${GRAPH}/v1.0/servicePrincipals/${principal_id}?\$select=id,displayName" \
    --query displayName -o tsv; then
    break
  fi
  if ! grep -qiE "Not Found|Request_ResourceNotFound" "$err_file"; then
    die "could not look up service principal ${principal_id}: $(scrub <"$err_file")"
  fi
  if ((attempt >= LOOKUP_ATTEMPTS)); then
    die "no service principal with object id ${principal_id} in tenant ${tenant_id} (from the ${source_of_id}).
Pass the managed identity's principal (object) id, not its client id, and check that az is signed in to the
tenant you deployed to. A just-created identity can take a few minutes to appear: try again shortly."
  fi
  echo "Service principal ${principal_id} not found yet (attempt ${attempt}/${LOOKUP_ATTEMPTS}); retrying in ${RETRY_DELAY}s..."
  sleep "$RETRY_DELAY"
done
principal_name="$(graph_out | tr -d '\n')"
echo "Managed identity: ${principal_name:-<no display name>} (${principal_id})"
echo "WindowsDefenderATP: ${defender_sp_id}"

# --- existing assignments ---------------------------------------------------------------------------------
graph_call 'listing existing app role assignments' \
  --method GET --url "${GRAPH}/v1.0/servicePrincipals/${principal_id}/appRoleAssignments?\$select=appRoleId,resourceId&\$top=999" \
  --query "value[?resourceId=='${defender_sp_id}'].appRoleId" -o tsv ||
  die "could not list the app role assignments of ${principal_id}: $(scrub <"$err_file")"
granted="$(graph_out)"

# --- grant what is missing ----------------------------------------------------------------------------------
added=0
present=0
for role in "${ROLES[@]}"; do
  role_id="$(role_id_of "$role")"
  if grep -qxiF "$role_id" <<<"$granted"; then
    echo "  already granted: ${role}"
    present=$((present + 1))
    continue
  fi
  if $dry_run; then
    echo "  would grant:     ${role} (appRoleId ${role_id})"
    added=$((added + 1))
    continue
  fi
  body="{\"principalId\":\"${principal_id}\",\"resourceId\":\"${defender_sp_id}\",\"appRoleId\":\"${role_id}\"}"
  if graph_call "granting ${role}" --method POST \
    --url "${GRAPH}/v1.0/servicePrincipals/${principal_id}/appRoleAssignments" \
    --headers 'Content-Type=application/json' --body "$body" -o none; then
    echo "  granted:         ${role}"
    added=$((added + 1))
  elif grep -qi 'already exists' "$err_file"; then
    echo "  already granted: ${role}"
    present=$((present + 1))
  else
    die "granting ${role} failed: $(scrub <"$err_file")"
  fi
done

if $dry_run; then
  echo "Dry run: ${added} to grant, ${present} already granted."
else
  echo "Done: ${added} granted, ${present} already granted."
  if ((added > 0)); then
    echo "Managed identity tokens are cached for up to 24 hours: until the app gets a new token, the Defender"
    echo "API may still answer 403 naming one of these permissions. That clears on its own."
  fi
fi
