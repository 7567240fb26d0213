import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const root = fileURLToPath(new URL('..', import.meta.url));
const script = join(root, 'infra/scripts/grant-defender-permissions.sh');

const PRINCIPAL_ID = '11111111-2222-4333-8444-555555555555';
const DEFENDER_SP_ID = 'dddddddd-0000-4000-8000-000000000001';
const ROLE_IDS = {
  'Vulnerability.Read.All': '41269fc5-d04d-4bfd-bce7-43a51cea049a',
  'Software.Read.All': '37f71c98-d198-41ae-964d-2c49aab74926',
  'SecurityBaselinesAssessment.Read.All': 'e870c0c1-c1e4-4b53-9fba-6ea1c5eb4cbe',
} as const;
const OTHER_ROLE_ID = 'a833e4c5-0000-4000-8000-00000000beef';

/**
 * A stand-in for the Azure CLI. It logs every call (arguments separated by \x1f, one call per line) and
 * answers the calls the script makes the way `az ... --query Q -o tsv` would, from FAKE_* variables.
 * An unexpected call fails loudly so a change in the script shows up here.
 */
const FAKE_AZ = `#!/usr/bin/env bash
set -u
{ printf '%s\\x1f' "$@"; printf '\\n'; } >> "$FAKE_AZ_LOG"
if [ "\${1:-}" = account ]; then
  if [ "\${FAKE_LOGGED_IN:-1}" = 1 ]; then echo "tenant-0000"; exit 0; fi
  echo "ERROR: Please run 'az login' to setup account." >&2; exit 1
fi
[ "\${1:-}" = rest ] || { echo "fake az: unexpected call: $*" >&2; exit 90; }
shift
method=GET url='' query='' body=''
while [ $# -gt 0 ]; do
  case "$1" in
    --method) method="$2"; shift ;;
    --url) url="$2"; shift ;;
    --query) query="$2"; shift ;;
    --body) body="$2"; shift ;;
    --headers|-o|--output) shift ;;
  esac
  shift
done
case "$method $url" in
  "GET $FAKE_GRAPH/v1.0/servicePrincipals?\\$filter=appId%20eq%20'fc780465-2017-40d4-a0c5-307022471b92'"*)
    [ "\${FAKE_DEFENDER:-1}" = 1 ] || exit 0
    case "$query" in
      'value[0].id') echo "$FAKE_DEFENDER_SP_ID" ;;
      'value[0].appRoles[].[value, id]') printf '%s\\n' "$FAKE_ROLE_ROWS" ;;
      *) echo "fake az: unexpected query $query" >&2; exit 91 ;;
    esac ;;
  "GET $FAKE_GRAPH/v1.0/servicePrincipals/$FAKE_PRINCIPAL_ID?"*)
    echo "mdvm-test-identity" ;;
  "GET $FAKE_GRAPH/v1.0/servicePrincipals/"*'/appRoleAssignments?'*)
    [ "$query" = "value[?resourceId=='$FAKE_DEFENDER_SP_ID'].appRoleId" ] || { echo "fake az: unexpected query $query" >&2; exit 92; }
    for id in \${FAKE_ASSIGNED:-}; do echo "$id"; done ;;
  "GET $FAKE_GRAPH/v1.0/servicePrincipals/"*)
    echo 'ERROR: Not Found({"error":{"code":"Request_ResourceNotFound","message":"Resource does not exist."}})' >&2; exit 1 ;;
  "POST $FAKE_GRAPH/v1.0/servicePrincipals/"*'/appRoleAssignments')
    if [ "\${FAKE_POST_FORBIDDEN:-0}" = 1 ]; then
      echo 'ERROR: Forbidden({"error":{"code":"Authorization_RequestDenied","message":"Insufficient privileges to complete the operation."}})' >&2
      exit 1
    fi ;;
  *) echo "fake az: unexpected request $method $url" >&2; exit 93 ;;
esac
exit 0
`;

let dir: string;
let fakeAz: string;
let fakeAzd: string;
let logFile: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'mdvm-grant-'));
  fakeAz = join(dir, 'az');
  fakeAzd = join(dir, 'azd');
  logFile = join(dir, 'az.log');
  writeFileSync(fakeAz, FAKE_AZ);
  chmodSync(fakeAz, 0o755);
  writeFileSync(
    fakeAzd,
    `#!/usr/bin/env bash\n[ "$*" = "env get-value AZURE_MANAGED_IDENTITY_PRINCIPAL_ID" ] && echo "${PRINCIPAL_ID}"\n`,
  );
  chmodSync(fakeAzd, 0o755);
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

interface Run {
  status: number | null;
  out: string;
  calls: string[][];
}

function run(args: string[], env: Record<string, string | undefined> = {}): Run {
  writeFileSync(logFile, '');
  const base: Record<string, string | undefined> = { ...process.env };
  delete base.AZURE_MANAGED_IDENTITY_PRINCIPAL_ID;
  delete base.GRAPH_ENDPOINT;
  const result = spawnSync('bash', [script, ...args], {
    encoding: 'utf8',
    env: {
      ...base,
      AZ: fakeAz,
      AZD: join(dir, 'no-azd-here'),
      GRANT_RETRY_DELAY_SECONDS: '0',
      GRANT_LOOKUP_ATTEMPTS: '2',
      FAKE_AZ_LOG: logFile,
      FAKE_GRAPH: 'https://graph.microsoft.com',
      FAKE_PRINCIPAL_ID: PRINCIPAL_ID,
      FAKE_DEFENDER_SP_ID: DEFENDER_SP_ID,
      FAKE_ROLE_ROWS: [['Machine.Read.All', OTHER_ROLE_ID], ...Object.entries(ROLE_IDS)]
        .map((row) => row.join('\t'))
        .join('\n'),
      ...env,
    },
  });
  const calls = readFileSync(logFile, 'utf8')
    .split('\n')
    .filter((line) => line !== '')
    .map((line) => line.split('\x1f').slice(0, -1));
  return { status: result.status, out: `${result.stdout}${result.stderr}`, calls };
}

const posts = (calls: string[][]) => calls.filter((args) => args.includes('POST'));
const bodyOf = (args: string[]) => JSON.parse(args[args.indexOf('--body') + 1] ?? 'null');

describe('infra/scripts/grant-defender-permissions.sh', () => {
  it('is executable and prints help', () => {
    expect(existsSync(script)).toBe(true);
    const { status, out, calls } = run(['--help']);
    expect(status).toBe(0);
    expect(out).toMatch(/Usage: grant-defender-permissions\.sh \[--dry-run\] \[PRINCIPAL_ID\]/);
    expect(out).toContain('GRAPH_ENDPOINT');
    expect(calls).toEqual([]);
  });

  it('refuses to run without a principal id', () => {
    const { status, out } = run([]);
    expect(status).not.toBe(0);
    expect(out).toMatch(/no managed identity principal id/);
    expect(out).toContain('AZURE_MANAGED_IDENTITY_PRINCIPAL_ID');
  });

  it('refuses a principal id that is not a GUID', () => {
    const { status, out } = run(['mdvm-identity']);
    expect(status).not.toBe(0);
    expect(out).toMatch(/not a GUID/);
  });

  it('grants exactly the missing roles and skips the one already granted', () => {
    const { status, out, calls } = run([], {
      AZURE_MANAGED_IDENTITY_PRINCIPAL_ID: PRINCIPAL_ID,
      FAKE_ASSIGNED: `${OTHER_ROLE_ID} ${ROLE_IDS['Vulnerability.Read.All']}`,
    });
    expect(out).not.toMatch(/fake az/);
    expect(status).toBe(0);
    const posted = posts(calls);
    expect(posted).toHaveLength(2);
    for (const args of posted) {
      expect(args).toContain(`https://graph.microsoft.com/v1.0/servicePrincipals/${PRINCIPAL_ID}/appRoleAssignments`);
    }
    expect(posted.map(bodyOf)).toEqual([
      { principalId: PRINCIPAL_ID, resourceId: DEFENDER_SP_ID, appRoleId: ROLE_IDS['Software.Read.All'] },
      {
        principalId: PRINCIPAL_ID,
        resourceId: DEFENDER_SP_ID,
        appRoleId: ROLE_IDS['SecurityBaselinesAssessment.Read.All'],
      },
    ]);
    expect(out).toMatch(/already granted: Vulnerability\.Read\.All/);
    expect(out).toMatch(/Done: 2 granted, 1 already granted/);
  });

  it('takes the principal id from azd when the environment has none, and uses GRAPH_ENDPOINT', () => {
    const { status, calls } = run([], {
      AZD: fakeAzd,
      GRAPH_ENDPOINT: 'https://graph.microsoft.us/',
      FAKE_GRAPH: 'https://graph.microsoft.us',
    });
    expect(status).toBe(0);
    const posted = posts(calls);
    expect(posted).toHaveLength(3);
    expect(posted.map((args) => bodyOf(args).principalId)).toEqual([PRINCIPAL_ID, PRINCIPAL_ID, PRINCIPAL_ID]);
    expect(
      calls.every((args) => args[0] !== 'rest' || args.some((a) => a.startsWith('https://graph.microsoft.us/'))),
    ).toBe(true);
  });

  it('--dry-run posts nothing', () => {
    const { status, out, calls } = run(['--dry-run', PRINCIPAL_ID]);
    expect(status).toBe(0);
    expect(calls.length).toBeGreaterThan(0);
    expect(posts(calls)).toEqual([]);
    expect(out).toMatch(/would grant: +Vulnerability\.Read\.All/);
    expect(out).toMatch(/Dry run: 3 to grant, 0 already granted/);
  });

  it('is a no-op when every role is already granted', () => {
    const { status, out, calls } = run([PRINCIPAL_ID], { FAKE_ASSIGNED: Object.values(ROLE_IDS).join(' ') });
    expect(status).toBe(0);
    expect(posts(calls)).toEqual([]);
    expect(out).toMatch(/Done: 0 granted, 3 already granted/);
  });

  it('explains a tenant without Defender for Endpoint', () => {
    const { status, out, calls } = run([PRINCIPAL_ID], { FAKE_DEFENDER: '0' });
    expect(status).not.toBe(0);
    expect(out).toMatch(/WindowsDefenderATP service principal .* is not in tenant/);
    expect(out).toMatch(/Defender for Endpoint/);
    expect(posts(calls)).toEqual([]);
  });

  it('explains a missing az sign-in', () => {
    const { status, out } = run([PRINCIPAL_ID], { FAKE_LOGGED_IN: '0' });
    expect(status).not.toBe(0);
    expect(out).toMatch(/not signed in to the Azure CLI.*az login/);
  });

  it('names the directory roles when Graph answers 403', () => {
    const { status, out } = run([PRINCIPAL_ID], { FAKE_POST_FORBIDDEN: '1' });
    expect(status).not.toBe(0);
    expect(out).toMatch(/insufficient privileges/);
    expect(out).toMatch(/Privileged Role\s+Administrator/);
    expect(out).toMatch(/Cloud Application Administrator/);
    expect(out).toMatch(/AppRoleAssignment\.ReadWrite\.All/);
  });

  it('explains an unknown principal id (e.g. a client id passed instead)', () => {
    const { status, out, calls } = run(['99999999-2222-4333-8444-555555555555']);
    expect(status).not.toBe(0);
    expect(out).toMatch(/no service principal with object id 99999999-/);
    expect(out).toMatch(/not its client id/);
    expect(posts(calls)).toEqual([]);
  });
});

describe('GitHub workflows', () => {
  const repoPath = /(?:^|[\s'"=])\.?\/?((?:infra|\.ci|\.github|src|test|bench|docs)\/[\w./-]*\w)/g;

  it.each(['ci.yml', 'infra.yml'])('%s has jobs and runs only files that exist', (name) => {
    const text = readFileSync(join(root, '.github/workflows', name), 'utf8');
    expect(text).toMatch(/^jobs:$/m);
    expect(text).toMatch(new RegExp(`^name: ${name.replace('.yml', '')}$`, 'm'));

    // Lines of `run:` steps, including folded and literal blocks (the lines indented deeper than `run:`).
    const runLines: string[] = [];
    let blockIndent = -1;
    for (const line of text.split('\n')) {
      const indent = line.length - line.trimStart().length;
      if (blockIndent >= 0 && (line.trim() === '' || indent > blockIndent)) {
        runLines.push(line);
        continue;
      }
      blockIndent = -1;
      const match = /^(\s*)(?:- )?run:\s*(.*)$/.exec(line);
      if (match) {
        runLines.push(match[2] ?? '');
        if (/^[|>]/.test(match[2] ?? '')) blockIndent = match[1]?.length ?? 0;
      }
    }
    expect(runLines.length).toBeGreaterThan(0);

    const referenced = runLines.flatMap((line) => [...line.matchAll(repoPath)].map((m) => m[1] ?? ''));
    expect(referenced.length).toBeGreaterThan(0);
    for (const path of referenced) {
      expect(existsSync(join(root, path)), `${name} runs ${path}, which is not in the repository`).toBe(true);
    }
  });
});
