// The Function App's user-assigned managed identity. Every data-plane permission of the app (runtime
// storage, landing storage, Application Insights, the Defender API's application roles) is granted to it.

@description('Name of the user-assigned managed identity.')
param name string

@description('Azure region of the identity.')
param location string

@description('Tags applied to the identity.')
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

@description('Resource id of the identity.')
output IDENTITY_ID string = identity.id

@description('Name of the identity.')
output IDENTITY_NAME string = identity.name

@description('Client (application) id of the identity: AZURE_CLIENT_ID and AzureWebJobsStorage__clientId.')
output IDENTITY_CLIENT_ID string = identity.properties.clientId

@description('Principal (object) id of the identity: the subject of its role assignments.')
output IDENTITY_PRINCIPAL_ID string = identity.properties.principalId
