// Landing storage account: the byte-exact copies of the Defender export parts, _manifest.json and
// _latest.json (docs/contracts.md, "Landing layout"). A separate account from the runtime one so that downstream
// readers (Fabric, Synapse, Databricks, Data Explorer) can be granted access to the data and nothing else.
// Optional: an Event Grid system topic that puts a message on a queue whenever a snapshot's
// _manifest.json is created, the "snapshot ready" signal.

@description('Name of the storage account (3-24 lower-case letters and digits).')
@minLength(3)
@maxLength(24)
param name string

@description('Azure region of the account (and of the Event Grid system topic).')
param location string

@description('Tags applied to every resource of this module.')
param tags object = {}

@description('Landing container (app setting MDVM_LANDING_CONTAINER).')
@minLength(3)
@maxLength(63)
param containerName string = 'mdvm-landing'

@description('Hierarchical namespace (ADLS Gen2) on the landing account, for Fabric shortcuts, Synapse or Databricks over abfss://. Can only be chosen when the account is created.')
param enableHierarchicalNamespace bool = false

@description('Move landed blobs to the Cool tier this many days after their last modification. 0: never.')
@minValue(0)
param coolAfterDays int = 30

@description('Delete landed blobs this many days after their last modification. 0 (default): never, the full history is kept. Should be larger than coolAfterDays.')
@minValue(0)
param deleteAfterDays int = 0

@description('Create an Event Grid system topic on the account and a subscription that queues a message on snapshotsReadyQueueName for every BlobCreated event on a _manifest.json.')
param enableEventGrid bool = false

@description('Queue in the landing account that receives the "snapshot ready" events (only with enableEventGrid).')
@minLength(3)
@maxLength(63)
param snapshotsReadyQueueName string = 'mdvm-snapshots-ready'

@description('Principal (object) id of the Function App\'s managed identity; it gets Storage Blob Data Contributor on the landing container.')
param identityPrincipalId string

@description('Optional principal (object) id of a user, e.g. the one running azd, who gets Storage Blob Data Reader on the landing container. Empty: none.')
param readerPrincipalId string = ''

@description('Kind of principal readerPrincipalId is.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param readerPrincipalType string = 'User'

@description('Resource id of the Log Analytics workspace that receives the landing container\'s blob read, write and delete logs (the audit trail of who read or changed landed data).')
param logAnalyticsWorkspaceId string

// Built-in roles.
var storageBlobDataContributorRoleId = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
var storageBlobDataReaderRoleId = '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
var storageQueueDataMessageSenderRoleId = 'c6a89b2d-59bc-44d0-9896-0f6e12d7b80a'

// Lifecycle actions: only the ones switched on. With both days at 0 no policy is deployed at all.
var tierToCoolAction = coolAfterDays > 0 ? { tierToCool: { daysAfterModificationGreaterThan: coolAfterDays } } : {}
var deleteAction = deleteAfterDays > 0 ? { delete: { daysAfterModificationGreaterThan: deleteAfterDays } } : {}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    isHnsEnabled: enableHierarchicalNamespace
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    supportsHttpsTrafficOnly: true
    allowCrossTenantReplication: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource container 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: containerName
  properties: {
    publicAccess: 'None'
  }
}

resource lifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = if (coolAfterDays > 0 || deleteAfterDays > 0) {
  parent: storage
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'landing-retention'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: [
                '${containerName}/'
              ]
            }
            actions: {
              baseBlob: union(tierToCoolAction, deleteAction)
            }
          }
        }
      ]
    }
  }
  dependsOn: [
    container
  ]
}

// The app writes parts, _manifest.json and _latest.json into this one container and reads them back.
resource blobDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(container.id, identityPrincipalId, storageBlobDataContributorRoleId)
  scope: container
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributorRoleId)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Whoever looks at the landed data reads this one container, nothing else in the account.
resource blobDataReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(readerPrincipalId)) {
  name: guid(container.id, readerPrincipalId, storageBlobDataReaderRoleId)
  scope: container
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataReaderRoleId)
    principalId: readerPrincipalId
    principalType: readerPrincipalType
  }
}

// Audit trail: every read, write and delete of landed blobs (who, when, from where) in Log Analytics, table
// StorageBlobLogs. Downstream readers' access shows here as much as the app's own writes.
resource blobAuditLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'landing-blob-audit'
  scope: blobService
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        category: 'StorageRead'
        enabled: true
      }
      {
        category: 'StorageWrite'
        enabled: true
      }
      {
        category: 'StorageDelete'
        enabled: true
      }
    ]
  }
}

// --- optional: "snapshot ready" events ------------------------------------------------------------------

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = if (enableEventGrid) {
  parent: storage
  name: 'default'
}

resource snapshotsReadyQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = if (enableEventGrid) {
  parent: queueService
  name: snapshotsReadyQueueName
}

resource systemTopic 'Microsoft.EventGrid/systemTopics@2025-02-15' = if (enableEventGrid) {
  name: 'evgt-${name}'
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: storage.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

// Event Grid delivers with the system topic's own identity: it may add messages to this one queue.
resource queueMessageSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (enableEventGrid) {
  name: guid(snapshotsReadyQueue.id, systemTopic.id, storageQueueDataMessageSenderRoleId)
  scope: snapshotsReadyQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataMessageSenderRoleId)
    principalId: systemTopic.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// _manifest.json is written last and create-only, so one BlobCreated on it means "snapshot complete". Curated and
// change-set manifests (curated/…, changes/…) arrive here too: the subject says which.
resource snapshotReadySubscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = if (enableEventGrid) {
  parent: systemTopic
  name: 'snapshot-ready'
  properties: {
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      subjectBeginsWith: '/blobServices/default/containers/${containerName}/blobs/'
      subjectEndsWith: '_manifest.json'
    }
    deliveryWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      destination: {
        endpointType: 'StorageQueue'
        properties: {
          resourceId: storage.id
          queueName: snapshotsReadyQueue.name
          queueMessageTimeToLiveInSeconds: -1
        }
      }
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
  }
  dependsOn: [
    queueMessageSender
  ]
}

@description('Resource id of the landing storage account.')
output STORAGE_ID string = storage.id

@description('Name of the landing storage account.')
output STORAGE_NAME string = storage.name

@description('Blob endpoint of the landing account (app setting MDVM_LANDING_BLOB_ENDPOINT).')
output BLOB_ENDPOINT string = storage.properties.primaryEndpoints.blob

@description('Data Lake (dfs) endpoint of the landing account; abfss:// readers use it when the hierarchical namespace is on.')
output DFS_ENDPOINT string = storage.properties.primaryEndpoints.dfs

@description('Landing container name (app setting MDVM_LANDING_CONTAINER).')
output CONTAINER_NAME string = container.name

@description('Queue that receives the "snapshot ready" events; empty when enableEventGrid is false.')
output SNAPSHOTS_READY_QUEUE_NAME string = enableEventGrid ? snapshotsReadyQueueName : ''

@description('Name of the Event Grid system topic; empty when enableEventGrid is false.')
output EVENT_GRID_SYSTEM_TOPIC_NAME string = enableEventGrid ? 'evgt-${name}' : ''
