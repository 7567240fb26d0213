/**
 * The nine Defender Vulnerability Management export types that have a "via files" endpoint.
 * Data, not code: timers, the simulator and the docs are all generated from this list.
 * Paths keep the casing each Microsoft page documents (the service is case-insensitive, but
 * we send what is documented).
 */
export type DefenderPermission =
  | 'Vulnerability.Read.All'
  | 'Software.Read.All'
  | 'SecurityBaselinesAssessment.Read.All';

export interface ExportType {
  /** Stable id: used in landing paths, table keys, settings and function names. Never rename. */
  readonly id: string;
  readonly title: string;
  /** Via-files path exactly as documented. */
  readonly apiPath: string;
  /** The `<ExportName>` segment in Microsoft's blob paths. */
  readonly blobExportName: string;
  readonly permission: DefenderPermission;
  /** Largest documented `sasValidHours`. */
  readonly sasMaxHours: number;
  /** Documented default SAS lifetime when `sasValidHours` is omitted. */
  readonly sasDefaultHours: number;
  /** The paged JSON sibling (`…ByMachine`), as documented; information gathering has none. */
  readonly jsonPath?: string;
}

export const EXPORT_TYPES = [
  {
    id: 'software-vulnerabilities',
    title: 'Software vulnerabilities',
    apiPath: '/api/machines/SoftwareVulnerabilitiesExport',
    jsonPath: '/api/machines/SoftwareVulnerabilitiesByMachine',
    blobExportName: 'VaExport',
    permission: 'Vulnerability.Read.All',
    sasMaxHours: 6,
    sasDefaultHours: 1,
  },
  {
    id: 'software-inventory',
    title: 'Software inventory (CPE)',
    apiPath: '/api/machines/SoftwareInventoryExport',
    jsonPath: '/api/machines/SoftwareInventoryByMachine',
    blobExportName: 'SoftwareInventory',
    permission: 'Software.Read.All',
    sasMaxHours: 6,
    sasDefaultHours: 1,
  },
  {
    id: 'software-inventory-noncpe',
    title: 'Non-CPE software inventory',
    apiPath: '/api/machines/SoftwareInventoryNonCpeExport',
    jsonPath: '/api/machines/SoftwareInventoryNoProductCodeByMachine',
    blobExportName: 'NonCpeSoftwareInventory',
    permission: 'Software.Read.All',
    sasMaxHours: 6,
    sasDefaultHours: 1,
  },
  {
    id: 'secure-configuration',
    title: 'Secure configuration assessment',
    apiPath: '/api/machines/SecureConfigurationsAssessmentExport',
    jsonPath: '/api/machines/SecureConfigurationsAssessmentByMachine',
    blobExportName: 'ScaExport',
    permission: 'Vulnerability.Read.All',
    sasMaxHours: 6,
    sasDefaultHours: 1,
  },
  {
    id: 'security-baselines',
    title: 'Security baselines assessment',
    apiPath: '/api/machines/BaselineComplianceAssessmentExport',
    jsonPath: '/api/machines/baselineComplianceAssessmentByMachine',
    blobExportName: 'BaselineAssessmentExport',
    permission: 'SecurityBaselinesAssessment.Read.All',
    sasMaxHours: 6,
    sasDefaultHours: 1,
  },
  {
    id: 'certificates',
    title: 'Certificate inventory',
    apiPath: '/api/machines/certificateAssessmentExport',
    jsonPath: '/api/machines/certificateAssessmentByMachine',
    blobExportName: 'CertificateAssessmentExport',
    permission: 'Vulnerability.Read.All',
    sasMaxHours: 24,
    sasDefaultHours: 3,
  },
  {
    id: 'hardware-firmware',
    title: 'Hardware and firmware inventory',
    apiPath: '/api/machines/HardwareFirmwareInventoryExport',
    jsonPath: '/api/machines/HardwareFirmwareInventoryByMachine',
    blobExportName: 'FirmwareHardwareExport',
    permission: 'Software.Read.All',
    sasMaxHours: 6,
    sasDefaultHours: 1,
  },
  {
    id: 'browser-extensions',
    title: 'Browser extensions inventory',
    apiPath: '/api/machines/browserextensionsinventoryExport',
    jsonPath: '/api/Machines/BrowserExtensionsInventoryByMachine',
    blobExportName: 'BrowserExtensions',
    permission: 'Software.Read.All',
    sasMaxHours: 6,
    sasDefaultHours: 1,
  },
  {
    id: 'information-gathering',
    title: 'Information gathering',
    apiPath: '/api/Machines/InfoGatheringExport',
    blobExportName: 'InfoGatheringExport',
    permission: 'Vulnerability.Read.All',
    sasMaxHours: 6,
    sasDefaultHours: 1,
  },
] as const satisfies readonly ExportType[];

export type ExportId = (typeof EXPORT_TYPES)[number]['id'];

export const EXPORT_IDS: readonly ExportId[] = EXPORT_TYPES.map((t) => t.id);

/** Every WindowsDefenderATP application permission some export type needs, each once. */
export const DEFENDER_PERMISSIONS: readonly DefenderPermission[] = [...new Set(EXPORT_TYPES.map((t) => t.permission))];

export type CatalogEntry = (typeof EXPORT_TYPES)[number];

const byId = new Map<string, CatalogEntry>(EXPORT_TYPES.map((t) => [t.id, t]));

export function isExportId(value: string): value is ExportId {
  return byId.has(value);
}

export function getExportType(id: ExportId): CatalogEntry {
  const type = byId.get(id);
  if (!type) throw new Error(`unknown export type '${id}'`);
  return type;
}

/** The export types that can also be read as paged JSON (`MDVM_JSON_EXPORTS`). */
export const JSON_EXPORT_IDS: readonly ExportId[] = EXPORT_TYPES.filter((t) => 'jsonPath' in t).map((t) => t.id);

/**
 * The software-vulnerability delta (`SoftwareVulnerabilityChangesByMachine`): JSON only, `sinceTime` at most 14
 * days back, produced in 6-hour slices. Landed under its own export id, beside the full snapshots.
 */
export const DELTA_EXPORT = {
  id: 'software-vulnerabilities-delta',
  title: 'Software vulnerability changes (delta)',
  apiPath: '/api/machines/SoftwareVulnerabilityChangesByMachine',
  permission: 'Vulnerability.Read.All',
  /** The full export whose snapshot a delta continues from. */
  fullExportId: 'software-vulnerabilities',
  maxLookbackInMs: 14 * 24 * 3_600_000,
  sliceInMs: 6 * 3_600_000,
} as const satisfies { permission: DefenderPermission; fullExportId: ExportId } & Record<string, unknown>;

/** Every export id the app lands: the nine via-files types and the delta. */
export type LandedExportId = ExportId | typeof DELTA_EXPORT.id;

/** What the app runs with these settings: the exports in MDVM_EXPORTS, and the delta when it is on. */
export function landedExports(config: { exports: readonly ExportId[]; delta: unknown }): LandedExportId[] {
  return [...config.exports, ...(config.delta ? [DELTA_EXPORT.id] : [])];
}

/** Title of any landed export id, the delta included (manifests carry it). */
export function exportTitle(id: string): string {
  return id === DELTA_EXPORT.id ? DELTA_EXPORT.title : (byId.get(id)?.title ?? id);
}

/** Documented paged-JSON and delta call budget, per endpoint. */
export const JSON_CALLS_PER_MINUTE = 30;
export const JSON_CALLS_PER_HOUR = 1000;
/** Largest documented `pageSize` of the JSON and delta endpoints (default 50,000). */
export const MAX_PAGE_SIZE = 200_000;

/** Documented via-files call budget, per endpoint. */
export const VIA_FILES_CALLS_PER_MINUTE = 5;
export const VIA_FILES_CALLS_PER_HOUR = 20;
