// The operator's workbook in Application Insights (Workbooks gallery of the component): snapshots per export with
// status and lag, throughput, part outcomes, failures by error class, Defender API answers and the last errors.
// Every query reads the Log Analytics workspace (AppTraces, AppMetrics) and lives in infra/queries/*.kql, where the
// offline Kusto check and the README's Monitoring section use the same text.

@description('Display name of the workbook in the portal.')
@minLength(1)
param displayName string

@description('Azure region of the workbook (the region of the Application Insights component).')
param location string

@description('Tags applied to the workbook.')
param tags object = {}

@description('Resource id of the Application Insights component the workbook is listed under.')
param applicationInsightsId string

@description('Resource id of the Log Analytics workspace the workbook queries.')
param logAnalyticsWorkspaceId string

// One query step of the workbook, reading the workspace over the workbook's time range.
func queryStep(name string, title string, query string, visualization string, workspaceId string) object => {
  type: 3
  name: name
  content: {
    version: 'KqlItem/1.0'
    title: title
    query: query
    size: 0
    queryType: 0
    resourceType: 'microsoft.operationalinsights/workspaces'
    crossComponentResources: [
      workspaceId
    ]
    timeContextFromParameter: 'TimeRange'
    visualization: visualization
  }
}

func textStep(name string, markdown string) object => {
  type: 1
  name: name
  content: {
    json: markdown
  }
}

var workbookContent = {
  version: 'Notebook/1.0'
  items: [
    textStep('intro', '## mdvm-ingest\nSnapshots landed from Defender Vulnerability Management, how fast, and what failed. The queries are in the README, "Monitoring".')
    {
      type: 9
      name: 'parameters'
      content: {
        version: 'KqlParameterItem/1.0'
        style: 'pills'
        queryType: 0
        resourceType: 'microsoft.operationalinsights/workspaces'
        parameters: [
          {
            id: '6f0b8a52-5c3e-4d0e-9a43-1d2f7c9e8b10'
            version: 'KqlParameterItem/1.0'
            name: 'TimeRange'
            label: 'Time range'
            type: 4
            isRequired: true
            value: {
              durationMs: 604800000
            }
            typeSettings: {
              selectableValues: [
                { durationMs: 86400000 }
                { durationMs: 259200000 }
                { durationMs: 604800000 }
                { durationMs: 2592000000 }
              ]
            }
          }
        ]
      }
    }
    queryStep('snapshots', 'Snapshots per export: status and lag (minutes after generatedTime)', loadTextContent('../queries/workbook-snapshots.kql'), 'table', logAnalyticsWorkspaceId)
    queryStep('lag', 'Snapshot lag per export (completed snapshots)', loadTextContent('../queries/workbook-lag.kql'), 'table', logAnalyticsWorkspaceId)
    queryStep('throughput', 'MiB landed per hour', loadTextContent('../queries/workbook-throughput.kql'), 'timechart', logAnalyticsWorkspaceId)
    queryStep('parts', 'Part outcomes per hour', loadTextContent('../queries/workbook-parts.kql'), 'barchart', logAnalyticsWorkspaceId)
    queryStep('failures', 'Failures by error class', loadTextContent('../queries/workbook-failures.kql'), 'table', logAnalyticsWorkspaceId)
    queryStep('defender', 'Defender API calls by answer', loadTextContent('../queries/workbook-defender-calls.kql'), 'table', logAnalyticsWorkspaceId)
    queryStep('errors', 'Last errors', loadTextContent('../queries/workbook-last-errors.kql'), 'table', logAnalyticsWorkspaceId)
    queryStep('derived', 'Derived data per day (curated Parquet, change sets)', loadTextContent('../queries/workbook-derived.kql'), 'table', logAnalyticsWorkspaceId)
  ]
  fallbackResourceIds: [
    applicationInsightsId
  ]
  '$schema': 'https://github.com/Microsoft/Application-Insights-Workbooks/blob/master/schema/workbook.json'
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  // Workbook names must be GUIDs; this one is stable per component, so a redeploy updates it in place.
  name: guid(applicationInsightsId, 'mdvm-ingest-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: displayName
    category: 'workbook'
    sourceId: applicationInsightsId
    serializedData: string(workbookContent)
    version: '1.0'
  }
}

@description('Resource id of the workbook.')
output WORKBOOK_ID string = workbook.id
