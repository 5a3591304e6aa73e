// "Cognitive Services OpenAI User" on the Azure OpenAI account for the web app's and the staging
// slot's system-assigned identities: the gateway calls the model with a managed identity token
// (auth = managed-identity, provider app-service), never with a model key.

param openAiAccountName string
param principalIds array

// Cognitive Services OpenAI User: inference calls, no management rights.
var openAiUserRole = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'

resource openAi 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: openAiAccountName
}

resource openAiUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for principalId in principalIds: {
    name: guid(openAi.id, principalId, openAiUserRole)
    scope: openAi
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', openAiUserRole)
      principalId: principalId
      principalType: 'ServicePrincipal'
    }
  }
]
