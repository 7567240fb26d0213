// Alert rules over the Log Analytics workspace that receives the app's telemetry (workspace-based Application
// Insights: AppRequests, AppTraces) and the storage logs (StorageQueueLogs): parts dead-lettered, function
// invocations failing, and a snapshot still incomplete N hours after Defender generated it. With an e-mail
// address, an action group mails every alert; without, the alerts show in the portal (Monitor > Alerts) only.
// The late-snapshot rule reads the app's `mdvm.request` / `mdvm.snapshot` trace lines; a metric with fixed
// dimensions will replace that query when the telemetry work lands (infra/README.md, "Audit logs and alerts").

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

// A PutMessage on the poison queue: the Functions host gave up on a part after maxDequeueCount deliveries, or
// the app dead-lettered a message it refused. Either way a part is not landing until someone acts (`requeue`).
var poisonQuery = replace(
  '''
StorageQueueLogs
| where OperationName == "PutMessage" and StatusCode between (200 .. 299)
| where ObjectKey contains "/__POISON_QUEUE__"
| project TimeGenerated, AccountName, ObjectKey, AuthenticationType, CallerIpAddress
''',
  '__POISON_QUEUE__',
  poisonQueueName
)

// Function invocations that ended in an exception (timer ticks and part copies alike).
var failuresQuery = '''
AppRequests
| where Success == false
| project TimeGenerated, OperationName, ResultCode, AppRoleName, OperationId
'''

// Snapshots the app asked for (enqueued or resumed) with no completion, superseding or "unchanged" since, whose
// generatedTime (encoded in the snapshot id, e.g. 2026-11-22T1801Z) is older than the limit.
var lateSnapshotQuery = replace(
  '''
let limit = __HOURS__h;
AppTraces
| where TimeGenerated > ago(2d)
| where Message startswith "mdvm.request " or Message startswith "mdvm.snapshot "
| extend event = tostring(split(Message, " ")[0]), e = parse_json(substring(Message, indexof(Message, " ") + 1))
| extend export = tostring(e.export), snapshot = tostring(e.snapshot), outcome = tostring(e.outcome)
| where isnotempty(snapshot)
| summarize
    asked = countif(event == "mdvm.request" and outcome in ("enqueued", "resumed")),
    done = countif(outcome in ("completed", "unchanged", "superseded"))
    by export, snapshot
| where asked > 0 and done == 0
| extend generatedTime = todatetime(strcat(substring(snapshot, 0, 13), ":", substring(snapshot, 13, 2), ":00Z"))
| where generatedTime < ago(limit)
''',
  '__HOURS__',
  string(snapshotCompleteWithinHours)
)

resource poisonAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: '${namePrefix}-poison'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'mdvm-ingest: parts dead-lettered'
    description: 'A message was put on ${poisonQueueName}: a part is not landing. Find the reason with `mdvm-ingest status` and the dead letter, fix it, then `mdvm-ingest requeue` (docs/contracts.md, "Failure semantics").'
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

@description('Resource ids of the alert rules.')
output ALERT_RULE_IDS array = [
  poisonAlert.id
  failuresAlert.id
  lateSnapshotAlert.id
]

@description('Resource id of the action group; empty without alertEmail.')
output ACTION_GROUP_ID string = empty(alertEmail) ? '' : actionGroup.id
