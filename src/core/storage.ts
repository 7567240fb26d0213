import { TableClient } from '@azure/data-tables';
import type { TokenCredential } from '@azure/identity';
import { BlobServiceClient, type ContainerClient } from '@azure/storage-blob';
import { type QueueClient, QueueServiceClient } from '@azure/storage-queue';
import type { AppConfig, StorageEndpoint } from './config.js';

export interface StorageClients {
  readonly queue: QueueClient;
  readonly poisonQueue: QueueClient;
  /** Curated parts and change sets to build (src/derive), and where failed ones are parked. */
  readonly deriveQueue: QueueClient;
  readonly derivePoisonQueue: QueueClient;
  readonly snapshotsTable: TableClient;
  readonly partsTable: TableClient;
  readonly landing: ContainerClient;
}

function queueService(endpoint: StorageEndpoint, credential: TokenCredential): QueueServiceClient {
  return endpoint.kind === 'connection-string'
    ? QueueServiceClient.fromConnectionString(endpoint.connectionString)
    : new QueueServiceClient(endpoint.url, credential);
}

function tableClient(endpoint: StorageEndpoint, table: string, credential: TokenCredential): TableClient {
  if (endpoint.kind === 'connection-string') {
    return TableClient.fromConnectionString(endpoint.connectionString, table, {
      allowInsecureConnection: /UseDevelopmentStorage=true|http:\/\//i.test(endpoint.connectionString),
    });
  }
  return new TableClient(endpoint.url, table, credential);
}

function blobService(endpoint: StorageEndpoint, credential: TokenCredential): BlobServiceClient {
  return endpoint.kind === 'connection-string'
    ? BlobServiceClient.fromConnectionString(endpoint.connectionString)
    : new BlobServiceClient(endpoint.url, credential);
}

export function createStorageClients(config: AppConfig, credential: TokenCredential): StorageClients {
  const queues = queueService(config.runtimeStorage.queue, credential);
  return {
    queue: queues.getQueueClient(config.queueName),
    poisonQueue: queues.getQueueClient(config.poisonQueueName),
    deriveQueue: queues.getQueueClient(config.derive.queueName),
    derivePoisonQueue: queues.getQueueClient(config.derive.poisonQueueName),
    snapshotsTable: tableClient(config.runtimeStorage.table, config.snapshotsTable, credential),
    partsTable: tableClient(config.runtimeStorage.table, config.partsTable, credential),
    landing: blobService(config.landing.blob, credential).getContainerClient(config.landing.container),
  };
}

/**
 * Create the queue, poison queue, tables and landing container when missing. In Azure the
 * infrastructure creates them; this is for local runs and tests (and is harmless when they exist).
 */
export async function ensureStorage(clients: StorageClients): Promise<void> {
  await Promise.all([
    clients.queue.createIfNotExists(),
    clients.poisonQueue.createIfNotExists(),
    clients.deriveQueue.createIfNotExists(),
    clients.derivePoisonQueue.createIfNotExists(),
    clients.snapshotsTable.createTable(),
    clients.partsTable.createTable(),
    clients.landing.createIfNotExists(),
  ]);
}

/** A small blob body (a manifest, a pointer) as text, read from the same response as its ETag. */
export async function streamToString(stream: NodeJS.ReadableStream): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk));
  return Buffer.concat(chunks).toString('utf8');
}
