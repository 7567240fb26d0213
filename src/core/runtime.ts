import { DefaultAzureCredential, type TokenCredential } from '@azure/identity';
import type { ContainerClient } from '@azure/storage-blob';
import type { QueueClient } from '@azure/storage-queue';
import type { AppConfig } from './config.js';
import { PartCopier } from './copier.js';
import { DefenderExportClient, type DefenderExportClientOptions } from './defenderClient.js';
import { ManifestStore } from './manifestStore.js';
import { createStorageClients, type StorageClients } from './storage.js';

/** Long-lived collaborators, built once per process from the config. Knows nothing of the Functions host. */
export interface Runtime {
  readonly config: AppConfig;
  readonly defender: DefenderExportClient;
  readonly store: ManifestStore;
  readonly queue: QueueClient;
  readonly poisonQueue: QueueClient;
  readonly landing: ContainerClient;
  readonly copier: PartCopier;
  readonly storage: StorageClients;
  readonly now: () => Date;
}

export interface RuntimeOptions {
  credential?: TokenCredential;
  defenderClientOptions?: DefenderExportClientOptions;
  now?: () => Date;
}

export function createCredential(config: AppConfig): TokenCredential {
  return new DefaultAzureCredential(
    config.managedIdentityClientId ? { managedIdentityClientId: config.managedIdentityClientId } : {},
  );
}

export function createRuntime(config: AppConfig, options: RuntimeOptions = {}): Runtime {
  const credential = options.credential ?? createCredential(config);
  const storage = createStorageClients(config, credential);
  return {
    config,
    defender: new DefenderExportClient(config.defender.baseUrl, credential, config.defender.scope, {
      timeoutInMs: config.defender.timeoutInMs,
      maxRetries: config.defender.maxRetries,
      maxRetryWaitInMs: config.defender.maxRetryWaitInMs,
      ...options.defenderClientOptions,
    }),
    store: new ManifestStore(storage.snapshotsTable, storage.partsTable),
    queue: storage.queue,
    poisonQueue: storage.poisonQueue,
    landing: storage.landing,
    copier: new PartCopier(storage.landing, config.copy),
    storage,
    now: options.now ?? (() => new Date()),
  };
}
