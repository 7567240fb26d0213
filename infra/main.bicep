// mdvm-ingest on Azure: one resource group with a Flex Consumption Function App, its runtime storage
// account, a separate landing storage account, a user-assigned managed identity with least-privilege data
// roles, Log Analytics and Application Insights (Entra authentication only). No keys anywhere.
// Deploy with `azd up` (azure.yaml, main.parameters.json); see infra/README.md.
targetScope = 'subscription'

@description('Name of the azd environment; prefixes the resource group and seeds the resource names.')
@minLength(1)
@maxLength(64)
param environmentName string

// The regions that offered the Flex Consumption plan when this was written (the list the Azure-Samples Flex
// Consumption azd templates use, less the canary region). azd offers only these; a region outside the list fails
// before anything is created. To check a region today: az functionapp list-flexconsumption-locations -o table.
// A region Azure has added since can be added here (infra/README.md, "Choose the region").
@description('Azure region of every resource. It must offer the Flex Consumption plan: az functionapp list-flexconsumption-locations -o table.')
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Optional principal (object) id of the user running azd (AZURE_PRINCIPAL_ID); it gets Storage Blob Data Reader on the landing container. Empty: none.')
param principalId string = ''

@description('Kind of principal principalId is (AZURE_PRINCIPAL_TYPE): User when a person runs azd, ServicePrincipal in a pipeline.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param principalType string = 'User'

@description('Memory of each Function App instance in MB: 512, 2048 or 4096.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Most instances the Function App scales out to (40-1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Hierarchical namespace (ADLS Gen2) on the landing account, for Fabric shortcuts, Synapse or Databricks. Only settable when the account is created.')
param enableHierarchicalNamespace bool = false

@description('Days after the last modification at which landed blobs move to the Cool tier. 0: never.')
@minValue(0)
param coolAfterDays int = 30

@description('Days after the last modification at which landed blobs are deleted. 0 (default): never, the full history is kept.')
@minValue(0)
param deleteAfterDays int = 0

@description('Queue a "snapshot ready" message (Event Grid BlobCreated on _manifest.json) on the landing account\'s mdvm-snapshots-ready queue.')
param enableEventGrid bool = false

@description('Defender API base URL (MDVM_DEFENDER_API_BASE_URL), e.g. a geo host such as https://eu.api.security.microsoft.com.')
param defenderApiBaseUrl string = 'https://api.security.microsoft.com'

@description('Token scope of the Defender API (MDVM_DEFENDER_TOKEN_SCOPE).')
param defenderTokenScope string = 'https://api.securitycenter.microsoft.com/.default'

@description('Export types to land (MDVM_EXPORTS): all, or a comma-separated list of export ids.')
param exports string = 'all'

@description('Six-field NCRONTAB schedule of every export timer (MDVM_SCHEDULE); default hourly at :17.')
param schedule string = '0 17 * * * *'

@description('sasValidHours asked of the Defender API, 1-24, capped per export type (MDVM_SAS_VALID_HOURS).')
@minValue(1)
@maxValue(24)
param sasValidHours int = 6

@description('Copy mode (MDVM_COPY_MODE): server (the storage service copies the bytes) or stream (through the function).')
@allowed([
  'server'
  'stream'
])
param copyMode string = 'server'

@description('Export ids read through their paged JSON endpoint instead of via files (MDVM_JSON_EXPORTS), comma-separated; each must be in exports. Empty: all via files.')
param jsonExports string = ''

@description('Six-field NCRONTAB schedule of the software-vulnerability delta (MDVM_DELTA_SCHEDULE), e.g. 0 30 */6 * * *. Empty: the delta is off.')
param deltaSchedule string = ''

@description('Export ids whose completed snapshots are also written as curated Parquet under curated/ (MDVM_CURATED_EXPORTS): all, a comma-separated list, or empty (off). Each must be in exports.')
param curatedExports string = ''

@description('Export ids whose completed snapshots get a change set against the previous complete one under changes/ (MDVM_CHANGE_SET_EXPORTS): all, a comma-separated list, or empty (off). Each must be in exports.')
param changeSetExports string = ''

@description('E-mail address that receives the alerts (poison queue, function failures, late snapshot, Defender 401/403). Empty: the alert rules fire into the Azure portal only.')
param alertEmail string = ''

@description('Hours after a snapshot\'s generatedTime by which it must be complete; a snapshot still incomplete then raises an alert.')
@minValue(1)
@maxValue(40)
param snapshotCompleteWithinHours int = 6

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}

// Abbreviations as in the azd templates (abbreviations.json). Storage account names: 'stfn' (functions
// runtime) or 'stld' (landing) + the 13-character token = 17 lower-case letters and digits (limit 24).
var names = {
  resourceGroup: 'rg-${environmentName}'
  logAnalytics: 'log-${resourceToken}'
  applicationInsights: 'appi-${resourceToken}'
  identity: 'id-${resourceToken}'
  plan: 'plan-${resourceToken}'
  functionApp: 'func-${resourceToken}'
  runtimeStorage: 'stfn${resourceToken}'
  landingStorage: 'stld${resourceToken}'
  deploymentContainer: 'app-package-${resourceToken}'
  alertPrefix: 'alert-${resourceToken}'
  actionGroup: 'ag-${resourceToken}'
}

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: names.resourceGroup
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: names.identity
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: names.logAnalytics
    applicationInsightsName: names.applicationInsights
    location: location
    tags: tags
    metricsPublisherPrincipalId: identity.outputs.IDENTITY_PRINCIPAL_ID
  }
}

module runtimeStorage 'modules/runtime-storage.bicep' = {
  name: 'runtime-storage'
  scope: rg
  params: {
    name: names.runtimeStorage
    location: location
    tags: tags
    deploymentContainerName: names.deploymentContainer
    identityPrincipalId: identity.outputs.IDENTITY_PRINCIPAL_ID
    operatorPrincipalId: principalId
    operatorPrincipalType: principalType
    logAnalyticsWorkspaceId: monitoring.outputs.LOG_ANALYTICS_ID
  }
}

module landingStorage 'modules/landing-storage.bicep' = {
  name: 'landing-storage'
  scope: rg
  params: {
    name: names.landingStorage
    location: location
    tags: tags
    enableHierarchicalNamespace: enableHierarchicalNamespace
    coolAfterDays: coolAfterDays
    deleteAfterDays: deleteAfterDays
    enableEventGrid: enableEventGrid
    identityPrincipalId: identity.outputs.IDENTITY_PRINCIPAL_ID
    readerPrincipalId: principalId
    readerPrincipalType: principalType
    logAnalyticsWorkspaceId: monitoring.outputs.LOG_ANALYTICS_ID
  }
}

module functionApp 'modules/function-app.bicep' = {
  name: 'function-app'
  scope: rg
  params: {
    name: names.functionApp
    planName: names.plan
    location: location
    tags: tags
    identityId: identity.outputs.IDENTITY_ID
    identityClientId: identity.outputs.IDENTITY_CLIENT_ID
    runtimeStorageAccountName: runtimeStorage.outputs.STORAGE_NAME
    deploymentContainerName: runtimeStorage.outputs.DEPLOYMENT_CONTAINER_NAME
    landingStorageAccountName: landingStorage.outputs.STORAGE_NAME
    landingContainerName: landingStorage.outputs.CONTAINER_NAME
    applicationInsightsName: monitoring.outputs.APPLICATIONINSIGHTS_NAME
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    partsQueueName: runtimeStorage.outputs.PARTS_QUEUE_NAME
    deriveQueueName: runtimeStorage.outputs.DERIVE_QUEUE_NAME
    snapshotsTableName: runtimeStorage.outputs.SNAPSHOTS_TABLE_NAME
    partsTableName: runtimeStorage.outputs.PARTS_TABLE_NAME
    defenderApiBaseUrl: defenderApiBaseUrl
    defenderTokenScope: defenderTokenScope
    exports: exports
    schedule: schedule
    sasValidHours: sasValidHours
    copyMode: copyMode
    jsonExports: jsonExports
    deltaSchedule: deltaSchedule
    curatedExports: curatedExports
    changeSetExports: changeSetExports
  }
}

module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    namePrefix: names.alertPrefix
    actionGroupName: names.actionGroup
    location: location
    tags: tags
    logAnalyticsWorkspaceId: monitoring.outputs.LOG_ANALYTICS_ID
    poisonQueueName: runtimeStorage.outputs.POISON_QUEUE_NAME
    derivePoisonQueueName: runtimeStorage.outputs.DERIVE_POISON_QUEUE_NAME
    alertEmail: alertEmail
    snapshotCompleteWithinHours: snapshotCompleteWithinHours
  }
}

module workbook 'modules/workbook.bicep' = {
  name: 'workbook'
  scope: rg
  params: {
    displayName: 'mdvm-ingest (${environmentName})'
    location: location
    tags: tags
    applicationInsightsId: monitoring.outputs.APPLICATIONINSIGHTS_ID
    logAnalyticsWorkspaceId: monitoring.outputs.LOG_ANALYTICS_ID
  }
}

@description('Region of the deployment.')
output AZURE_LOCATION string = location

@description('Tenant of the subscription.')
output AZURE_TENANT_ID string = tenant().tenantId

@description('Resource group holding every resource.')
output AZURE_RESOURCE_GROUP string = rg.name

@description('Name of the Function App (azd deploys the api service to it).')
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.FUNCTION_APP_NAME

@description('Client id of the Function App\'s managed identity.')
output AZURE_MANAGED_IDENTITY_CLIENT_ID string = identity.outputs.IDENTITY_CLIENT_ID

@description('Principal (object) id of the managed identity; the postprovision hook grants it the Defender API roles.')
output AZURE_MANAGED_IDENTITY_PRINCIPAL_ID string = identity.outputs.IDENTITY_PRINCIPAL_ID

@description('Blob endpoint of the landing account.')
output MDVM_LANDING_BLOB_ENDPOINT string = landingStorage.outputs.BLOB_ENDPOINT

@description('Landing container.')
output MDVM_LANDING_CONTAINER string = landingStorage.outputs.CONTAINER_NAME

@description('Name of the runtime storage account.')
output RUNTIME_STORAGE_ACCOUNT_NAME string = runtimeStorage.outputs.STORAGE_NAME

@description('Name of the landing storage account.')
output LANDING_STORAGE_ACCOUNT_NAME string = landingStorage.outputs.STORAGE_NAME

@description('Name of the Application Insights component.')
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.APPLICATIONINSIGHTS_NAME
