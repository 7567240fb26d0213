// Flex Consumption plan and the Function App. The app runs as the user-assigned identity everywhere: the
// deployment package container, AzureWebJobsStorage (host and queue trigger), the app's own storage
// clients (AZURE_CLIENT_ID), Application Insights (Entra authentication) and the Defender API.
// No setting carries a key or a connection string.

@description('Name of the Function App.')
param name string

@description('Name of the Flex Consumption plan.')
param planName string

@description('Azure region of the plan and the app (must offer Flex Consumption).')
param location string

@description('Tags applied to the plan and the app; the app also gets azd-service-name: api.')
param tags object = {}

@description('Resource id of the user-assigned managed identity the app runs as.')
param identityId string

@description('Client id of that identity (AZURE_CLIENT_ID, AzureWebJobsStorage__clientId).')
param identityClientId string

@description('Name of the runtime storage account (AzureWebJobsStorage, parts queue, manifest tables, deployment container).')
param runtimeStorageAccountName string

@description('Blob container of the runtime account that holds the deployment package.')
param deploymentContainerName string

@description('Name of the landing storage account.')
param landingStorageAccountName string

@description('Landing container (MDVM_LANDING_CONTAINER).')
param landingContainerName string

@description('Name of the Application Insights component the app sends telemetry to.')
param applicationInsightsName string

@description('Memory of each instance in MB: 512 (0.25 core), 2048 (1 core) or 4096 (2 cores).')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Most instances the app scales out to (Flex Consumption: 40 to 1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Parts queue (MDVM_PARTS_QUEUE).')
param partsQueueName string = 'mdvm-parts'

@description('Derive queue (MDVM_DERIVE_QUEUE).')
param deriveQueueName string = 'mdvm-derive'

@description('Snapshots table (MDVM_SNAPSHOTS_TABLE).')
param snapshotsTableName string = 'snapshots'

@description('Parts table (MDVM_PARTS_TABLE).')
param partsTableName string = 'parts'

@description('Defender API base URL (MDVM_DEFENDER_API_BASE_URL).')
param defenderApiBaseUrl string = 'https://api.security.microsoft.com'

@description('Token scope for the Defender API (MDVM_DEFENDER_TOKEN_SCOPE).')
param defenderTokenScope string = 'https://api.securitycenter.microsoft.com/.default'

@description('Export types to land: all, or a comma-separated list of export ids (MDVM_EXPORTS).')
param exports string = 'all'

@description('Six-field NCRONTAB schedule of the export timers (MDVM_SCHEDULE).')
param schedule string = '0 17 * * * *'

@description('sasValidHours asked of the Defender API, 1-24 (MDVM_SAS_VALID_HOURS).')
@minValue(1)
@maxValue(24)
param sasValidHours int = 6

@description('server: the storage service copies the bytes; stream: through the function (MDVM_COPY_MODE).')
@allowed([
  'server'
  'stream'
])
param copyMode string = 'server'

@description('Export ids read through their paged JSON endpoint (MDVM_JSON_EXPORTS); empty: all via files.')
param jsonExports string = ''

@description('NCRONTAB schedule of the software-vulnerability delta (MDVM_DELTA_SCHEDULE); empty: off.')
param deltaSchedule string = ''

@description('Export ids whose completed snapshots are converted to curated Parquet (MDVM_CURATED_EXPORTS): all, a list, or empty (off).')
param curatedExports string = ''

@description('Export ids whose completed snapshots get a change set against the previous one (MDVM_CHANGE_SET_EXPORTS): all, a list, or empty (off).')
param changeSetExports string = ''

resource runtimeStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: runtimeStorageAccountName
}

resource landingStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: landingStorageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': 'api' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${runtimeStorage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'node'
        version: '22'
      }
    }
  }
}

// Every key below is read by the app (src/core/config.ts settingsSchema) or by the Functions host
// (HOST_SETTING_NAMES). Flex Consumption takes the runtime from functionAppConfig, so there is no
// FUNCTIONS_WORKER_RUNTIME; storage is identity-based, so there is no AzureWebJobsStorage connection string.
resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: {
    // Functions host: identity-based AzureWebJobsStorage (the queue trigger's connection) and Entra-only
    // Application Insights.
    AzureWebJobsStorage__blobServiceUri: runtimeStorage.properties.primaryEndpoints.blob
    AzureWebJobsStorage__queueServiceUri: runtimeStorage.properties.primaryEndpoints.queue
    AzureWebJobsStorage__tableServiceUri: runtimeStorage.properties.primaryEndpoints.table
    AzureWebJobsStorage__credential: 'managedidentity'
    AzureWebJobsStorage__clientId: identityClientId
    APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
    // Node.js arguments of the worker (src/deploy/nodeArguments.ts): a floor under V8's old-generation limit, so
    // a stream copy that counts records does not run a full GC every few MiB (docs/adr/0012).
    languageWorkers__node__arguments: '--initial-old-space-size=96'
    // The app.
    AZURE_CLIENT_ID: identityClientId
    MDVM_LANDING_BLOB_ENDPOINT: landingStorage.properties.primaryEndpoints.blob
    MDVM_LANDING_CONTAINER: landingContainerName
    MDVM_DEFENDER_API_BASE_URL: defenderApiBaseUrl
    MDVM_DEFENDER_TOKEN_SCOPE: defenderTokenScope
    MDVM_EXPORTS: exports
    MDVM_SCHEDULE: schedule
    MDVM_SAS_VALID_HOURS: string(sasValidHours)
    MDVM_PARTS_QUEUE: partsQueueName
    MDVM_SNAPSHOTS_TABLE: snapshotsTableName
    MDVM_PARTS_TABLE: partsTableName
    MDVM_COPY_MODE: copyMode
    MDVM_JSON_EXPORTS: jsonExports
    MDVM_DELTA_SCHEDULE: deltaSchedule
    MDVM_DERIVE_QUEUE: deriveQueueName
    MDVM_CURATED_EXPORTS: curatedExports
    MDVM_CHANGE_SET_EXPORTS: changeSetExports
  }
}

// Deployments go through Entra-authenticated publishing (azd, OneDeploy); no FTP or basic-auth SCM.
resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

@description('Name of the Function App.')
output FUNCTION_APP_NAME string = functionApp.name

@description('Resource id of the Function App.')
output FUNCTION_APP_ID string = functionApp.id

@description('Default host name of the Function App.')
output FUNCTION_APP_HOSTNAME string = functionApp.properties.defaultHostName

@description('Resource id of the Flex Consumption plan.')
output PLAN_ID string = plan.id
