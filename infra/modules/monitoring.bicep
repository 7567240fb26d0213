// Log Analytics workspace and workspace-based Application Insights with local (instrumentation key)
// authentication turned off: telemetry is accepted only with an Entra token, so the identity that sends it
// gets Monitoring Metrics Publisher on the component.

@description('Name of the Log Analytics workspace.')
param logAnalyticsName string

@description('Name of the Application Insights component.')
param applicationInsightsName string

@description('Azure region of both resources.')
param location string

@description('Tags applied to both resources.')
param tags object = {}

@description('Days the workspace keeps data.')
@minValue(30)
@maxValue(730)
param retentionInDays int = 30

@description('Principal (object) id of the managed identity that sends telemetry; it gets Monitoring Metrics Publisher on the component. Empty: no role assignment.')
param metricsPublisherPrincipalId string = ''

// Built-in role: Monitoring Metrics Publisher.
var monitoringMetricsPublisherRoleId = '3913510d-42f4-4e42-8a64-420c390055eb'

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
  }
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: applicationInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    DisableLocalAuth: true
    IngestionMode: 'LogAnalytics'
  }
}

resource metricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(metricsPublisherPrincipalId)) {
  name: guid(applicationInsights.id, metricsPublisherPrincipalId, monitoringMetricsPublisherRoleId)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisherRoleId)
    principalId: metricsPublisherPrincipalId
    principalType: 'ServicePrincipal'
  }
}

@description('Resource id of the Log Analytics workspace.')
output LOG_ANALYTICS_ID string = logAnalytics.id

@description('Name of the Log Analytics workspace.')
output LOG_ANALYTICS_NAME string = logAnalytics.name

@description('Resource id of the Application Insights component.')
output APPLICATIONINSIGHTS_ID string = applicationInsights.id

@description('Name of the Application Insights component.')
output APPLICATIONINSIGHTS_NAME string = applicationInsights.name
