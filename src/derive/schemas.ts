import { DELTA_EXPORT, type ExportId, type LandedExportId } from '../core/catalog.js';

/**
 * What a record of each export type holds, as data: one column list per type, with one canonical (PascalCase) name per
 * column and every spelling the field is known under. Microsoft's property tables are PascalCase, the JSON examples
 * mostly camelCase, third-party code reading real files reports PascalCase, and a few fields have two different names
 * (certificates: `KeySize` in the table, `keyLength` in the files). Everything downstream is generated from this list:
 * the Data Explorer tables and parse functions, the curated Parquet columns and the change-set keys.
 */
export type ColumnType = 'string' | 'long' | 'real' | 'bool' | 'datetime' | 'dynamic';

export interface Column {
  /** Canonical name: the column in curated Parquet and Data Explorer. */
  readonly name: string;
  readonly type: ColumnType;
  /** Every exact key spelling this field has been seen or documented under (Data Explorer matches case-sensitively). */
  readonly keys: readonly string[];
  /** A dynamic value that Defender sends as JSON text (parse twice): parsed into the value it encodes. */
  readonly jsonText?: boolean;
}

export interface RecordSchema {
  readonly exportId: LandedExportId;
  /** Data Explorer table name of the typed table; the raw table is `<table>Raw`. */
  readonly table: string;
  readonly columns: readonly Column[];
  /** Columns that identify one record within a snapshot: the change-set key. Always starts with DeviceId. */
  readonly keyColumns: readonly string[];
  /** Columns whose change under the same key is a `changed` row of the change set (e.g. a baseline check that flipped). */
  readonly trackedColumns: readonly string[];
  /** A date column after which the record counts as `expired` in a change set (certificates). */
  readonly expiryColumn?: string;
}

/** The column every curated row and typed table carries for fields no schema names (Defender adds columns unannounced). */
export const ADDITIONAL_PROPERTIES = 'AdditionalProperties';

/** `OSPlatform` → `osPlatform`, `CveId` → `cveId`, `ID` → `id`: how the JSON examples spell the property-table names. */
export function camelKey(name: string): string {
  const leadingCaps = /^[A-Z]+/.exec(name)?.[0] ?? '';
  if (leadingCaps.length <= 1 || leadingCaps.length === name.length) {
    return leadingCaps.length === name.length ? name.toLowerCase() : name.charAt(0).toLowerCase() + name.slice(1);
  }
  // `OSPlatform`: the last capital starts the next word.
  const run = leadingCaps.length - 1;
  return name.slice(0, run).toLowerCase() + name.slice(run);
}

/** The same key with its first letter upper-case (`osPlatform` → `OsPlatform`), as some files spell it. */
export function pascalKey(key: string): string {
  return key.charAt(0).toUpperCase() + key.slice(1);
}

function col(name: string, type: ColumnType, options: { also?: readonly string[]; jsonText?: boolean } = {}): Column {
  const camel = camelKey(name);
  const keys = new Set([camel, pascalKey(camel), name]);
  for (const other of options.also ?? []) {
    keys.add(other);
    keys.add(camelKey(other));
    keys.add(pascalKey(camelKey(other)));
  }
  return { name, type, keys: [...keys], ...(options.jsonText ? { jsonText: true } : {}) };
}

const device = {
  id: col('DeviceId', 'string'),
  name: col('DeviceName', 'string'),
  platform: col('OSPlatform', 'string'),
  version: col('OSVersion', 'string'),
  groupId: col('RbacGroupId', 'long'),
  groupName: col('RbacGroupName', 'string'),
};
const software = [col('SoftwareVendor', 'string'), col('SoftwareName', 'string'), col('SoftwareVersion', 'string')];

const vulnerabilityColumns = [
  col('Id', 'string', { also: ['ID'] }),
  device.id,
  device.name,
  device.platform,
  device.version,
  col('OSArchitecture', 'string'),
  device.groupId,
  device.groupName,
  ...software,
  col('CveId', 'string'),
  col('CvssScore', 'real'),
  col('VulnerabilitySeverityLevel', 'string'),
  col('ExploitabilityLevel', 'string'),
  col('RecommendedSecurityUpdate', 'string'),
  col('RecommendedSecurityUpdateId', 'string'),
  col('RecommendedSecurityUpdateUrl', 'string'),
  col('RecommendationReference', 'string'),
  col('SecurityUpdateAvailable', 'bool'),
  col('DiskPaths', 'dynamic'),
  col('RegistryPaths', 'dynamic', { also: ['Registry Paths'] }),
  col('FirstSeenTimestamp', 'datetime'),
  col('LastSeenTimestamp', 'datetime'),
];

export const RECORD_SCHEMAS: Readonly<Record<LandedExportId, RecordSchema>> = {
  'software-vulnerabilities': {
    exportId: 'software-vulnerabilities',
    table: 'MdvmSoftwareVulnerabilities',
    columns: vulnerabilityColumns,
    keyColumns: ['DeviceId', 'SoftwareVendor', 'SoftwareName', 'SoftwareVersion', 'CveId'],
    trackedColumns: ['VulnerabilitySeverityLevel', 'ExploitabilityLevel', 'SecurityUpdateAvailable'],
  },
  'software-inventory': {
    exportId: 'software-inventory',
    table: 'MdvmSoftwareInventory',
    columns: [
      device.id,
      device.name,
      device.platform,
      device.groupId,
      device.groupName,
      ...software,
      col('NumberOfWeaknesses', 'long'),
      col('DiskPaths', 'dynamic'),
      col('RegistryPaths', 'dynamic'),
      col('SoftwareFirstSeenTimestamp', 'datetime'),
      col('SoftwareLastSeenTimestamp', 'datetime'),
      col('EndOfSupportStatus', 'string'),
      col('EndOfSupportDate', 'datetime'),
    ],
    keyColumns: ['DeviceId', 'SoftwareVendor', 'SoftwareName', 'SoftwareVersion'],
    trackedColumns: ['EndOfSupportStatus', 'NumberOfWeaknesses'],
  },
  'software-inventory-noncpe': {
    exportId: 'software-inventory-noncpe',
    table: 'MdvmSoftwareInventoryNonCpe',
    columns: [
      device.id,
      device.name,
      device.platform,
      device.groupId,
      device.groupName,
      ...software,
      col('SoftwareLastSeenTimestamp', 'datetime'),
    ],
    keyColumns: ['DeviceId', 'SoftwareVendor', 'SoftwareName', 'SoftwareVersion'],
    trackedColumns: [],
  },
  'secure-configuration': {
    exportId: 'secure-configuration',
    table: 'MdvmSecureConfiguration',
    columns: [
      device.id,
      device.name,
      device.platform,
      device.version,
      device.groupId,
      device.groupName,
      col('ConfigurationId', 'string'),
      col('ConfigurationName', 'string'),
      col('ConfigurationCategory', 'string'),
      col('ConfigurationSubcategory', 'string'),
      // Documented as a string of 1-10, sent as a number.
      col('ConfigurationImpact', 'real'),
      col('IsApplicable', 'bool'),
      col('IsCompliant', 'bool'),
      col('IsExpectedUserImpact', 'bool'),
      col('RecommendationReference', 'string'),
      col('Timestamp', 'datetime'),
    ],
    keyColumns: ['DeviceId', 'ConfigurationId'],
    trackedColumns: ['IsCompliant', 'IsApplicable'],
  },
  'security-baselines': {
    exportId: 'security-baselines',
    table: 'MdvmSecurityBaselines',
    columns: [
      col('Id', 'string', { also: ['ID'] }),
      device.id,
      device.name,
      col('ProfileId', 'string'),
      col('ConfigurationId', 'string'),
      device.platform,
      device.version,
      device.groupId,
      device.groupName,
      col('IsApplicable', 'bool'),
      col('IsCompliant', 'bool'),
      col('DataCollectionTimeOffset', 'datetime'),
      col('ComplianceCalculationTimeOffset', 'datetime'),
      // Strings in the property table, arrays of strings in the files.
      col('RecommendedValue', 'dynamic'),
      col('CurrentValue', 'dynamic'),
      col('Source', 'dynamic'),
    ],
    keyColumns: ['DeviceId', 'ProfileId', 'ConfigurationId'],
    trackedColumns: ['IsCompliant', 'IsApplicable', 'CurrentValue'],
  },
  certificates: {
    exportId: 'certificates',
    table: 'MdvmCertificates',
    columns: [
      device.id,
      device.name,
      col('Thumbprint', 'string'),
      col('Path', 'string'),
      col('SignatureAlgorithm', 'string'),
      // The property table and the files name half the fields differently.
      col('KeyLength', 'long', { also: ['KeySize'] }),
      col('NotAfter', 'datetime', { also: ['ExpirationDate'] }),
      col('NotBefore', 'datetime', { also: ['IssueDate'] }),
      col('SubjectType', 'string'),
      col('SerialNumber', 'string'),
      col('SubjectObject', 'dynamic', { also: ['IssuedTo'] }),
      col('IssuerObject', 'dynamic', { also: ['IssuedBy'] }),
      col('KeyUsageArray', 'dynamic', { also: ['KeyUsage'] }),
      col('ExtendedKeyUsageArray', 'dynamic', { also: ['ExtendedKeyUsage'] }),
      col('IsSelfSigned', 'bool'),
      device.groupId,
      device.groupName,
    ],
    keyColumns: ['DeviceId', 'Thumbprint', 'Path'],
    trackedColumns: [],
    expiryColumn: 'NotAfter',
  },
  'hardware-firmware': {
    exportId: 'hardware-firmware',
    table: 'MdvmHardwareFirmware',
    columns: [
      device.id,
      device.groupId,
      device.groupName,
      device.name,
      col('ComponentType', 'string'),
      col('Manufacturer', 'string'),
      col('ComponentName', 'string'),
      col('ComponentFamily', 'string'),
      col('ComponentVersion', 'string'),
      col('AdditionalFields', 'dynamic', { jsonText: true }),
    ],
    keyColumns: ['DeviceId', 'ComponentType', 'Manufacturer', 'ComponentName'],
    trackedColumns: ['ComponentVersion'],
  },
  'browser-extensions': {
    exportId: 'browser-extensions',
    table: 'MdvmBrowserExtensions',
    columns: [
      device.id,
      device.name,
      device.groupId,
      device.groupName,
      col('InstallationTime', 'datetime'),
      col('BrowserName', 'string'),
      col('ExtensionId', 'string'),
      col('ExtensionName', 'string'),
      col('ExtensionDescription', 'string'),
      col('ExtensionVersion', 'string'),
      col('ExtensionRisk', 'string'),
      col('IsActivated', 'bool'),
      col('Permissions', 'dynamic'),
    ],
    keyColumns: ['DeviceId', 'BrowserName', 'ExtensionId'],
    trackedColumns: ['ExtensionVersion', 'IsActivated', 'ExtensionRisk'],
  },
  'information-gathering': {
    exportId: 'information-gathering',
    table: 'MdvmInformationGathering',
    columns: [
      device.id,
      device.name,
      device.platform,
      device.version,
      device.groupId,
      device.groupName,
      col('LastSeenTime', 'datetime'),
      col('Timestamp', 'datetime'),
      col('DeviceGatheredInfo', 'dynamic', { jsonText: true }),
      col('AdditionalFields', 'dynamic', { jsonText: true }),
    ],
    keyColumns: ['DeviceId'],
    trackedColumns: ['OSVersion'],
  },
  [DELTA_EXPORT.id]: {
    exportId: DELTA_EXPORT.id,
    table: 'MdvmSoftwareVulnerabilityChanges',
    columns: [
      ...vulnerabilityColumns,
      col('EventTimestamp', 'datetime'),
      col('Status', 'string'),
      col('IsOnboarded', 'bool'),
    ],
    // A delta is already a change list and has no change set of its own; this is the key that de-duplicates the
    // overlap between windows (README, "Duplicates you will see in the delta").
    keyColumns: ['DeviceId', 'Id', 'RbacGroupId', 'Status', 'EventTimestamp'],
    trackedColumns: [],
  },
};

export function recordSchema(exportId: LandedExportId): RecordSchema {
  return RECORD_SCHEMAS[exportId];
}

/** The via-files export types, whose consecutive snapshots can be compared (the delta is already a change list). */
export function hasChangeSets(exportId: LandedExportId): exportId is ExportId {
  return exportId !== DELTA_EXPORT.id;
}
