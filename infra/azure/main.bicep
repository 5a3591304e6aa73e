// aigw on Azure App Service, laid out as the reference sample deploys its gateway: `azd up` from the
// repository root (azure.yaml) provisions this template, then builds infra/Dockerfile, pushes the
// image to the registry below and points the web app (and nothing else) at it.
//
// Subscription scope so `azd up` can create the resource group; everything else is in
// appservice.bicep. Parameters come from main.parameters.json (azd fills in the environment name and
// location, and asks for the rest).

targetScope = 'subscription'

@description('azd environment name; names the resource group and prefixes every resource.')
@minLength(3)
@maxLength(20)
param environmentName string

@description('Region of every resource.')
param location string

@description('Name of the existing Azure OpenAI (or AI Services) account the gateway fronts.')
param openAiAccountName string

@description('Resource group of that account.')
param openAiResourceGroup string

@description('SHA-256 (lower-case hex) of the platform subscription key: printf %s "$KEY" | sha256sum. No key value enters the deployment.')
param platformKeySha256 string

@description('SHA-256 (lower-case hex) of the admin API key (/admin/chargeback); it must differ from the subscription key.')
param adminKeySha256 string

@description('Put [redis] (the Azure Managed Redis below) into the gateway config. Leave false until the gateway speaks TLS, OSS cluster and Entra ID to Redis: today it refuses rediss:// at start-up.')
param redisInConfig bool = false

@description('OTLP/HTTP endpoint of an OpenTelemetry Collector that forwards to Application Insights (azuremonitor exporter), e.g. https://my-collector.example.net:4318. Empty: the OTLP export is off (/metrics still answers).')
param otlpEndpoint string = ''

var tags = { 'azd-env-name': environmentName }

resource group 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module gateway 'appservice.bicep' = {
  name: 'aigw-appservice'
  scope: group
  params: {
    name: environmentName
    location: location
    tags: tags
    openAiAccountName: openAiAccountName
    openAiResourceGroup: openAiResourceGroup
    platformKeySha256: platformKeySha256
    adminKeySha256: adminKeySha256
    redisInConfig: redisInConfig
    otlpEndpoint: otlpEndpoint
  }
}

// Role assignment on the Azure OpenAI account, in that account's resource group.
module openAiRoles 'openai-role.bicep' = {
  name: 'aigw-openai-roles'
  scope: resourceGroup(openAiResourceGroup)
  params: {
    openAiAccountName: openAiAccountName
    principalIds: [gateway.outputs.appPrincipalId, gateway.outputs.stagingPrincipalId]
  }
}

// Read by azd: where to push the image.
output AZURE_CONTAINER_REGISTRY_ENDPOINT string = gateway.outputs.registryLoginServer
output AZURE_RESOURCE_GROUP string = group.name
output GATEWAY_URL string = gateway.outputs.url
output GATEWAY_STAGING_URL string = gateway.outputs.stagingUrl
output REDIS_HOST string = gateway.outputs.redisHost
