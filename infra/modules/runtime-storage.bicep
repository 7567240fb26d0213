// Runtime storage account: the Functions host's own blobs (leases, timer schedule monitor), the Flex
// Consumption deployment package container, the parts queue and its poison queue, and the manifest tables.
// Shared key access is off: everything, the host included, authenticates with the managed identity.

@description('Name of the storage account (3-24 lower-case letters and digits).')
@minLength(3)
@maxLength(24)
param name string

@description('Azure region of the account.')
param location string

@description('Tags applied to the account.')
param tags object = {}

@description('Blob container the Flex Consumption plan deploys the app package to.')
@minLength(3)
@maxLength(63)
param deploymentContainerName string

@description('Parts queue (app setting MDVM_PARTS_QUEUE). Its poison queue, <name>-poison, is created beside it.')
@minLength(3)
@maxLength(56)
param partsQueueName string = 'mdvm-parts'

@description('Derive queue (app setting MDVM_DERIVE_QUEUE): curated parts and change sets to build. Its poison queue, <name>-poison, is created beside it.')
@minLength(3)
@maxLength(56)
param deriveQueueName string = 'mdvm-derive'

@description('Snapshots table (app setting MDVM_SNAPSHOTS_TABLE).')
@minLength(3)
@maxLength(63)
param snapshotsTableName string = 'snapshots'

@description('Parts table (app setting MDVM_PARTS_TABLE).')
@minLength(3)
@maxLength(63)
param partsTableName string = 'parts'

@description('Principal (object) id of the Function App\'s managed identity; it gets the data roles below.')
param identityPrincipalId string

@description('Principal (object) id of the person or pipeline that runs azd (AZURE_PRINCIPAL_ID). It gets Storage Table Data Reader on the two tables, which `mdvm-ingest status` and `verify` read; empty: no grant. `requeue` and `derive` write: grant those by hand (infra/README.md).')
param operatorPrincipalId string = ''

@description('Kind of principal operatorPrincipalId is.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param operatorPrincipalType string = 'User'

@description('Resource id of the Log Analytics workspace that receives the queue logs (table StorageQueueLogs): every message put on, read from and deleted from the parts queue and its poison queue.')
param logAnalyticsWorkspaceId string

// Built-in roles.
var storageBlobDataOwnerRoleId = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
var storageQueueDataContributorRoleId = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
var storageTableDataContributorRoleId = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
var storageTableDataReaderRoleId = '76199698-9eea-4c19-bc75-cec21354c6b6'

// The host dead-letters to '<queue>-poison'; the app reads the same name (config.ts poisonQueueName).
var queueNames = [
  partsQueueName
  '${partsQueueName}-poison'
  deriveQueueName
  '${deriveQueueName}-poison'
]

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
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [
  for queueName in queueNames: {
    parent: queueService
    name: queueName
  }
]

// Queue logs: what was enqueued, retried and dead-lettered, and by whom. The poison-queue alert reads them.
resource queueLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'runtime-queue-logs'
  scope: queueService
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

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource snapshotsTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: snapshotsTableName
}

resource partsTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: partsTableName
}

// The host keeps its leases and timer state in blobs and the platform reads and writes the deployment
// package container: Storage Blob Data Owner on the account, as the Flex Consumption samples grant.
resource blobDataOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identityPrincipalId, storageBlobDataOwnerRoleId)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataOwnerRoleId)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Queue triggers, enqueueing and dead-lettering: only the parts and derive queues and their poison queues.
resource queueDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for i in range(0, length(queueNames)): {
    name: guid(queues[i].id, identityPrincipalId, storageQueueDataContributorRoleId)
    scope: queues[i]
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributorRoleId)
      principalId: identityPrincipalId
      principalType: 'ServicePrincipal'
    }
  }
]

// Manifest state: only the two tables.
resource snapshotsTableDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(snapshotsTable.id, identityPrincipalId, storageTableDataContributorRoleId)
  scope: snapshotsTable
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributorRoleId)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource partsTableDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(partsTable.id, identityPrincipalId, storageTableDataContributorRoleId)
  scope: partsTable
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributorRoleId)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// The operator's read of the manifest state, for the CLI commands the alerts point to (status, verify).
resource operatorSnapshotsTableReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(operatorPrincipalId)) {
  name: guid(snapshotsTable.id, operatorPrincipalId, storageTableDataReaderRoleId)
  scope: snapshotsTable
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataReaderRoleId)
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}

resource operatorPartsTableReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(operatorPrincipalId)) {
  name: guid(partsTable.id, operatorPrincipalId, storageTableDataReaderRoleId)
  scope: partsTable
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataReaderRoleId)
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}

@description('Resource id of the runtime storage account.')
output STORAGE_ID string = storage.id

@description('Name of the runtime storage account.')
output STORAGE_NAME string = storage.name

@description('Blob endpoint of the runtime account, e.g. https://<account>.blob.core.windows.net/.')
output BLOB_ENDPOINT string = storage.properties.primaryEndpoints.blob

@description('Queue endpoint of the runtime account.')
output QUEUE_ENDPOINT string = storage.properties.primaryEndpoints.queue

@description('Table endpoint of the runtime account.')
output TABLE_ENDPOINT string = storage.properties.primaryEndpoints.table

@description('Deployment package container name.')
output DEPLOYMENT_CONTAINER_NAME string = deploymentContainer.name

@description('Parts queue name.')
output PARTS_QUEUE_NAME string = queues[0].name

@description('Poison queue name.')
output POISON_QUEUE_NAME string = queues[1].name

@description('Name of the derive queue (app setting MDVM_DERIVE_QUEUE).')
output DERIVE_QUEUE_NAME string = queues[2].name

@description('Name of the derive queue\'s poison queue.')
output DERIVE_POISON_QUEUE_NAME string = queues[3].name

@description('Snapshots table name.')
output SNAPSHOTS_TABLE_NAME string = snapshotsTable.name

@description('Parts table name.')
output PARTS_TABLE_NAME string = partsTable.name
