// Alert rules over the Log Analytics workspace that receives the app's telemetry (workspace-based Application
// Insights: AppRequests from the host, AppTraces and AppMetrics from the app's OpenTelemetry log records and
// metrics) and the storage logs (StorageQueueLogs): parts dead-lettered, function invocations failing, a snapshot
// still incomplete N hours after Defender generated it, and Defender refusing the app (401/403). With an e-mail
// address, an action group mails every alert; without, the alerts show in the portal (Monitor > Alerts) only.

@description('Prefix of the alert rule names, e.g. alert-<token>.')
@minLength(1)
param namePrefix string

@description('Name of the action group created when alertEmail is set.')
param actionGroupName string

@description('Azure region of the alert rules (the region of the workspace).')
param location string

@description('Tags applied to every resource of this module.')
param tags object = {}

@description('Resource id of the Log Analytics workspace the rules query.')
param logAnalyticsWorkspaceId string

@description('Poison queue of the parts queue (runtime storage); a message put on it is a part given up on.')
param poisonQueueName string

@description('Poison queue of the derive queue (runtime storage); a message put on it is a curated part or change set given up on.')
param derivePoisonQueueName string

@description('E-mail address that receives every alert. Empty: no action group, the alerts fire into the portal only.')
param alertEmail string = ''

@description('Hours after a snapshot\'s generatedTime by which it must be complete.')
@minValue(1)
@maxValue(40)
param snapshotCompleteWithinHours int = 6

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: actionGroupName
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'mdvm-ingest'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var actionGroups = empty(alertEmail) ? [] : [actionGroup.id]

// The queries live in infra/queries/*.kql (checked offline with the Kusto language service and shown in the
// README's Monitoring section); placeholders in capitals are filled here.
var poisonQuery = replace(
  replace(loadTextContent('../queries/alert-poison.kql'), '__POISON_QUEUE__', poisonQueueName),
  '__DERIVE_POISON_QUEUE__',
  derivePoisonQueueName
)
var failuresQuery = loadTextContent('../queries/alert-function-failures.kql')
var lateSnapshotQuery = replace(
  loadTextContent('../queries/alert-snapshot-late.kql'),
  '__HOURS__',
  string(snapshotCompleteWithinHours)
)
var defenderDeniedQuery = loadTextContent('../queries/alert-defender-denied.kql')

resource poisonAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-poison'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'mdvm-ingest: parts dead-lettered'
    description: 'A message was put on ${poisonQueueName} or ${derivePoisonQueueName}: a part, curated part or change set is not landing. Find the reason with `mdvm-ingest status` and the dead letter, fix it, then `mdvm-ingest requeue` (parts) or `mdvm-ingest derive` (derived data) (docs/contracts.md, "Failure semantics").'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    scopes: [
      logAnalyticsWorkspaceId
    ]
    criteria: {
      allOf: [
        {
          query: poisonQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: actionGroups
    }
  }
}

resource failuresAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-function-failures'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'mdvm-ingest: function failures'
    description: 'A timer tick or a part copy failed. Application Insights > Failures shows the exception; the part copies retry on their own, a timer failure retries on the next tick.'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT15M'
    windowSize: 'PT15M'
    scopes: [
      logAnalyticsWorkspaceId
    ]
    criteria: {
      allOf: [
        {
          query: failuresQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: actionGroups
    }
  }
}

resource lateSnapshotAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-snapshot-late'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'mdvm-ingest: snapshot not complete in time'
    description: 'A snapshot is still incomplete ${snapshotCompleteWithinHours} hours after its generatedTime. `mdvm-ingest status` names the export and what is missing.'
    severity: 1
    enabled: true
    evaluationFrequency: 'PT1H'
    windowSize: 'PT1H'
    overrideQueryTimeRange: 'P2D'
    scopes: [
      logAnalyticsWorkspaceId
    ]
    criteria: {
      allOf: [
        {
          query: lateSnapshotQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: actionGroups
    }
  }
}

resource defenderDeniedAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-defender-denied'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'mdvm-ingest: Defender API refused the app (401/403)'
    description: 'Defender answered 401 or 403 to the export API: the app identity lost its API permission or admin consent, or the tenant/audience setting is wrong. No new snapshot is requested until it is fixed; landed data is untouched. See the README, "Monitoring".'
    severity: 1
    enabled: true
    evaluationFrequency: 'PT15M'
    windowSize: 'PT1H'
    scopes: [
      logAnalyticsWorkspaceId
    ]
    criteria: {
      allOf: [
        {
          query: defenderDeniedQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: actionGroups
    }
  }
}

@description('Resource ids of the alert rules.')
output ALERT_RULE_IDS array = [
  poisonAlert.id
  failuresAlert.id
  lateSnapshotAlert.id
  defenderDeniedAlert.id
]

@description('Resource id of the action group; empty without alertEmail.')
output ACTION_GROUP_ID string = empty(alertEmail) ? '' : actionGroup.id
