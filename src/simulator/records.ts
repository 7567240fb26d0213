import { createHash } from 'node:crypto';
import type { ExportId } from '../core/catalog.js';

/**
 * Realistic, deterministic records for every export type, shaped like the sample records Microsoft documents for each export type:
 * camelCase keys for most types, PascalCase for browser extensions and information gathering,
 * null CVE ids, JSON carried inside strings, mixed timestamp formats.
 */
export type Rng = () => number;

export function seededRng(seed: string): Rng {
  let state = createHash('sha256').update(seed).digest().readUInt32LE(0) || 1;
  return () => {
    // xorshift32: fast, deterministic, good enough for fake data.
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) / 0x1_0000_0000;
  };
}

const pick = <T>(rng: Rng, items: readonly T[]): T => items[Math.floor(rng() * items.length)] as T;
const hex = (rng: Rng, length: number): string =>
  Array.from({ length }, () => Math.floor(rng() * 16).toString(16)).join('');

export interface Device {
  deviceId: string;
  deviceName: string;
  osPlatform: string;
  osVersion: string;
  rbacGroupId: number;
  rbacGroupName: string;
}

const GROUP_NAMES: Record<number, string> = {
  0: 'UnassignedGroup',
  12: 'Finance Workstations',
  31: 'Servers',
  44: 'Engineering',
};
const SOFTWARE = [
  ['google', 'chrome', '131.0.6778.70'],
  ['microsoft', 'windows_11', '10.0.26100.2314'],
  ['microsoft', '.net_framework', '4.8.09037'],
  ['mozilla', 'firefox', '133.0'],
  ['oracle', 'jre', '8.0.4310'],
  ['7-zip', '7-zip', '24.08'],
] as const;

/**
 * Device `index` of an RBAC group: the same device in every export type and snapshot of the simulated tenant (its
 * fields come from its own seed), so downstream joins across exports by device find each other, as in a real tenant.
 */
export function makeDevice(rbacGroupId: number, index: number): Device {
  const rng = seededRng(`device/${rbacGroupId}/${index}`);
  const platform = pick(rng, ['Windows11', 'Windows10', 'WindowsServer2022', 'WindowsServer2019'] as const);
  return {
    deviceId: hex(rng, 40),
    deviceName: `${platform.startsWith('WindowsServer') ? 'srv' : 'ws'}-${rbacGroupId}-${String(index).padStart(4, '0')}.corp.example.test`,
    osPlatform: platform,
    osVersion: pick(rng, ['10.0.26100.2314', '10.0.19045.5131', '10.0.20348.2849']),
    rbacGroupId,
    rbacGroupName: GROUP_NAMES[rbacGroupId] ?? `Group ${rbacGroupId}`,
  };
}

const day = (rng: Rng): string =>
  `2026-${String(1 + Math.floor(rng() * 10)).padStart(2, '0')}-${String(1 + Math.floor(rng() * 27)).padStart(2, '0')}`;
const clock = (rng: Rng): string =>
  `${String(Math.floor(rng() * 24)).padStart(2, '0')}:${String(Math.floor(rng() * 60)).padStart(2, '0')}:${String(Math.floor(rng() * 60)).padStart(2, '0')}`;

type RecordMaker = (rng: Rng, d: Device, i: number) => Record<string, unknown>;

const makers: Record<ExportId, RecordMaker> = {
  'software-vulnerabilities': (rng, d, i) => {
    const [vendor, name, version] = pick(rng, SOFTWARE);
    const cve = rng() < 0.1 ? null : `CVE-2026-${10000 + Math.floor(rng() * 9000)}`;
    return {
      id: `${d.deviceId}_${name}_${version}_${cve ?? ''}_`,
      deviceId: d.deviceId,
      rbacGroupName: d.rbacGroupName,
      rbacGroupId: d.rbacGroupId,
      deviceName: d.deviceName,
      osPlatform: d.osPlatform,
      osVersion: d.osVersion,
      osArchitecture: 'x64',
      softwareVendor: vendor,
      softwareName: name,
      softwareVersion: version,
      cveId: cve,
      cvssScore: cve ? Math.round(rng() * 100) / 10 : null,
      vulnerabilitySeverityLevel: cve ? pick(rng, ['Low', 'Medium', 'High', 'Critical']) : null,
      recommendedSecurityUpdate: cve ? `${name} security update ${i % 7}` : null,
      recommendedSecurityUpdateId: cve && rng() < 0.5 ? String(5040000 + Math.floor(rng() * 9999)) : null,
      diskPaths: [`C:\\Program Files\\${vendor}\\${name}\\${name}.exe`],
      registryPaths: [`HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Uninstall\\${name}`],
      lastSeenTimestamp: `${day(rng)} ${clock(rng)}`,
      firstSeenTimestamp: `${day(rng)} ${clock(rng)}`,
      exploitabilityLevel: pick(rng, ['NoExploit', 'ExploitIsPublic', 'ExploitIsVerified', 'ExploitIsInKit']),
      recommendationReference: `va-_-${vendor}-_-${name}`,
      securityUpdateAvailable: rng() < 0.7,
    };
  },
  'software-inventory': (rng, d) => {
    const [vendor, name, version] = pick(rng, SOFTWARE);
    return {
      deviceId: d.deviceId,
      deviceName: d.deviceName,
      osPlatform: d.osPlatform,
      rbacGroupName: d.rbacGroupName,
      rbacGroupId: d.rbacGroupId,
      softwareVendor: vendor,
      softwareName: name,
      softwareVersion: version,
      numberOfWeaknesses: Math.floor(rng() * 12),
      diskPaths: [`C:\\Program Files\\${name}`],
      registryPaths: [],
      softwareFirstSeenTimestamp: `${day(rng)} ${clock(rng)}`,
      endOfSupportStatus: pick(rng, ['None', 'EOS Version', 'Upcoming EOS Version']),
      endOfSupportDate: rng() < 0.7 ? null : `${day(rng)}T00:00:00+00:00`,
    };
  },
  'software-inventory-noncpe': (rng, d, i) => ({
    deviceId: d.deviceId,
    deviceName: d.deviceName,
    osPlatform: d.osPlatform,
    rbacGroupName: d.rbacGroupName,
    rbacGroupId: d.rbacGroupId,
    softwareVendor: pick(rng, ['contoso ltd', 'fabrikam', 'litware inc']),
    softwareName: `internal tool ${i % 40}`,
    softwareVersion: `${1 + (i % 5)}.${i % 10}.${Math.floor(rng() * 100)}`,
    softwareLastSeenTimestamp: `${day(rng)} ${clock(rng)}.${Math.floor(rng() * 1000)}`,
  }),
  'secure-configuration': (rng, d, i) => {
    const scid = 2000 + (i % 300);
    return {
      deviceId: d.deviceId,
      deviceName: rng() < 0.05 ? null : d.deviceName,
      osPlatform: d.osPlatform,
      osVersion: d.osVersion,
      rbacGroupName: d.rbacGroupName,
      rbacGroupId: d.rbacGroupId,
      configurationId: `scid-${scid}`,
      configurationName: `Secure setting ${scid}`,
      configurationCategory: pick(rng, ['Application', 'OS', 'Network', 'Accounts', 'Security controls']),
      configurationSubcategory: rng() < 0.3 ? '' : 'Hardening',
      configurationImpact: Math.ceil(rng() * 10),
      isApplicable: true,
      isCompliant: rng() < 0.6,
      isExpectedUserImpact: rng() < 0.2,
      recommendationReference: `sca-_-scid-${scid}`,
      timestamp: `${day(rng)} ${clock(rng)}.${Math.floor(rng() * 1000)}`,
    };
  },
  'security-baselines': (rng, d, i) => {
    const profileId = '7f4c2d1e-0b9a-4c3d-8e2f-5a6b7c8d9e0f';
    const configurationId = `${1 + (i % 18)}.${1 + (i % 7)}.${1 + (i % 3)}`;
    return {
      id: `${d.deviceId}_${profileId}_${configurationId}`,
      deviceId: d.deviceId,
      deviceName: d.deviceName,
      profileId,
      configurationId,
      osPlatform: d.osPlatform,
      osVersion: d.osVersion,
      rbacGroupId: d.rbacGroupId,
      rbacGroupName: d.rbacGroupName,
      isApplicable: true,
      isCompliant: rng() < 0.5,
      dataCollectionTimeOffset: rng() < 0.1 ? null : `${day(rng)}T${clock(rng)}.000Z`,
      complianceCalculationTimeOffset: `${day(rng)}T${clock(rng)}.000Z`,
      recommendedValue: ['Enabled'],
      currentValue: [rng() < 0.5 ? 'Enabled' : 'Disabled'],
      source: ['Registry'],
    };
  },
  certificates: (rng, d) => {
    const thumbprint = hex(rng, 40).toUpperCase();
    return {
      deviceId: d.deviceId,
      deviceName: d.deviceName,
      thumbprint,
      path: `LocalMachine\\My\\${thumbprint}`,
      signatureAlgorithm: pick(rng, ['sha256RSA', 'sha384ECDSA', 'sha1RSA']),
      keyLength: pick(rng, [2048, 4096, 256]),
      notAfter: rng() < 0.05 ? '0001-01-01T00:00:00Z' : `${day(rng)}T${clock(rng)}Z`,
      notBefore: `${day(rng)}T${clock(rng)}Z`,
      subjectType: pick(rng, ['CA', 'End entity']),
      serialNumber: hex(rng, 32),
      subjectObject: null,
      issuerObject: null,
      keyUsageArray: null,
      extendedKeyUsageArray: null,
      isSelfSigned: rng() < 0.1,
      rbacGroupId: d.rbacGroupId,
      rbacGroupName: d.rbacGroupName,
    };
  },
  'hardware-firmware': (rng, d, i) => ({
    deviceId: d.deviceId,
    rbacGroupId: d.rbacGroupId,
    rbacGroupName: d.rbacGroupName,
    deviceName: d.deviceName,
    componentType: pick(rng, ['Hardware', 'Bios', 'Processor']),
    manufacturer: pick(rng, ['contoso', 'fabrikam', 'intel']),
    componentName: `component-${i % 9}`,
    componentVersion: `${1 + (i % 4)}.${Math.floor(rng() * 20)}`,
    additionalFields: JSON.stringify({
      SystemSKU: `SKU-${i % 13}`,
      BaseBoardManufacturer: 'contoso',
      DeviceFamily: 'Desktop',
    }),
  }),
  'browser-extensions': (rng, d, i) => ({
    DeviceId: d.deviceId,
    DeviceName: d.deviceName,
    RbacGroupId: d.rbacGroupId,
    RbacGroupName: d.rbacGroupName,
    InstallationTime: `${day(rng)}T${clock(rng)}.000Z`,
    BrowserName: pick(rng, ['chrome', 'edge', 'firefox']),
    ExtensionId: hex(rng, 32).replace(/[0-9]/g, (c) => String.fromCharCode(97 + Number(c))),
    ExtensionName: `Extension ${i % 50}`,
    ExtensionDescription: 'Does useful things.',
    ExtensionVersion: `${i % 9}.${i % 4}.1`,
    ExtensionRisk: pick(rng, ['None', 'Low', 'Medium', 'High', 'Critical']),
    IsActivated: rng() < 0.8,
    Permissions: [
      { Id: 'tabs', IsRequired: true, Risk: 'Medium' },
      { Id: 'storage', IsRequired: rng() < 0.5, Risk: 'Low' },
    ],
  }),
  'information-gathering': (rng, d) => ({
    DeviceId: d.deviceId,
    DeviceName: d.deviceName,
    LastSeenTime: `${day(rng)}T${clock(rng)}Z`,
    OsPlatform: d.osPlatform,
    OsVersion: d.osVersion,
    RbacGroupId: d.rbacGroupId,
    RbacGroupName: d.rbacGroupName,
    Timestamp: `${day(rng)}T${clock(rng)}Z`,
    DeviceGatheredInfo: JSON.stringify({
      AvMode: pick(rng, ['0', '1', '2']),
      AvSignatureVersion: `1.421.${Math.floor(rng() * 999)}.0`,
      AvEngineVersion: '1.1.24090.11',
      AvIsSignatureUptoDate: rng() < 0.9 ? 'true' : 'false',
      CloudProtectionState: 'Enabled',
      AvScanResults: JSON.stringify({
        Quick: { ScanStatus: 'Completed', ErrorCode: null, Timestamp: `${day(rng)}T${clock(rng)}Z` },
      }),
    }),
  }),
};

/** `count` JSON lines for one part, newline-terminated. */
export function generateRecords(exportId: ExportId, seed: string, rbacGroupId: number, count: number): string {
  const rng = seededRng(seed);
  const devices = Array.from({ length: Math.max(1, Math.ceil(count / 8)) }, (_, i) => makeDevice(rbacGroupId, i));
  const maker = makers[exportId];
  const lines: string[] = [];
  for (let i = 0; i < count; i++) lines.push(JSON.stringify(maker(rng, devices[i % devices.length] as Device, i)));
  return lines.length === 0 ? '' : `${lines.join('\n')}\n`;
}
