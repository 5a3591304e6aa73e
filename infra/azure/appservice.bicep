// The App Service deployment (called by main.bicep): a Linux P0v3 plan with three instances, the web
// app running the gateway's container with a staging slot on the same plan, a system-assigned
// identity for Azure OpenAI, Azure Managed Redis with Entra ID access, Log Analytics and
// Application Insights, a container registry for azd, and the gateway's config file.
//
// What works today and what does not (issue 17):
// - The gateway calls Azure OpenAI with the app's managed identity (provider app-service).
// - Azure Managed Redis is created with TLS, the OSS cluster policy, Entra ID access only and AOF
//   persistence, and the app's identities get its data access policy. The gateway cannot use it
//   yet: its Redis client has no TLS (rediss:// is refused at start-up), no cluster support and no
//   Entra ID token auth. Until then `redisInConfig` stays false and each instance counts limits,
//   caches and keeps its usage ledger on its own, in the container's file system (lost when the
//   instance is replaced).
// - Token metrics reach Application Insights only through an OpenTelemetry Collector
//   (`otlpEndpoint`); the gateway exports OTLP, Application Insights does not take it directly here.

param name string
param location string
param tags object

param openAiAccountName string
param openAiResourceGroup string
param platformKeySha256 string
param adminKeySha256 string
param redisInConfig bool
param otlpEndpoint string

// SIGTERM to exit: in-flight requests (streams included) get this long after App Service stops an
// instance (a swap, a scale-in, a restart).
var shutdownGraceSecs = 20

// The gateway's configuration document, written to an Azure Files share that the app mounts at
// /etc/aigw. {0}: the Azure OpenAI endpoint, {1}: shutdown grace, {2}: the platform key's hash,
// {3}: the admin key's hash, {4}: the [redis] section or nothing. Validated in CI
// (tests/python/test_infra.py runs `aigw check-config` on it, both with and without [redis]).
var aigwConfig = '''
[server]
listen = "0.0.0.0:8080"
shutdown-grace-secs = {1}
request-log = true

# The app's system-assigned identity holds "Cognitive Services OpenAI User" on the account.
[backends.aoai]
url = "{0}"
kind = "azure-openai"
auth = {{ type = "managed-identity", provider = "app-service" }}
timeout-secs = 300

[[subscriptions]]
id = "platform-admin"
name = "Platform team"
team = "platform"
apis = ["*"]
key-sha256 = "{2}"

[admin]
key-sha256 = "{3}"

[apis.aoai]
kind = "openai"
backend = "aoai"
outbound = [
  {{ policy = "set-header", name = "x-aigw-subscription", value = "{{subscription.id}}" }},
]
{4}'''

// Shared limits, cache and ledger in Azure Managed Redis. The URL is an app setting; see the
// header for why it is not in the config by default.
var redisSection = '''
[redis]
url-env = "AIGW_REDIS_URL"
'''

resource openAi 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: openAiAccountName
  scope: resourceGroup(openAiResourceGroup)
}

var renderedConfig = format(aigwConfig, openAi.properties.endpoint, shutdownGraceSecs, platformKeySha256, adminKeySha256, redisInConfig ? redisSection : '')

// ---- monitoring ---------------------------------------------------------------------------------

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${name}-logs'
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${name}-insights'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
  }
}

// ---- registry (azd pushes the image here; the app pulls it with a user-assigned identity) ------

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  name: replace('${name}acr${uniqueString(resourceGroup().id)}', '-', '')
  location: location
  tags: tags
  sku: { name: 'Basic' }
  properties: {
    adminUserEnabled: false
  }
}

resource pullIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${name}-pull'
  location: location
  tags: tags
}

var acrPullRole = '7f951dda-4ed3-4680-a7ca-43fe172d538d'

resource acrPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, pullIdentity.id, acrPullRole)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPullRole)
    principalId: pullIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// ---- the config file -----------------------------------------------------------------------------

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: take(replace('${name}cfg${uniqueString(resourceGroup().id)}', '-', ''), 24)
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
  }
}

resource share 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-05-01' = {
  name: '${storage.name}/default/aigw-config'
  properties: {
    shareQuota: 1
  }
}

// Writes config.toml into the share; runs again whenever the rendered config changes.
resource writeConfig 'Microsoft.Resources/deploymentScripts@2023-08-01' = {
  name: '${name}-write-config'
  location: location
  tags: tags
  kind: 'AzureCLI'
  dependsOn: [share]
  properties: {
    azCliVersion: '2.61.0'
    retentionInterval: 'PT1H'
    cleanupPreference: 'OnSuccess'
    forceUpdateTag: uniqueString(renderedConfig)
    environmentVariables: [
      { name: 'AIGW_CONFIG', value: renderedConfig }
      { name: 'STORAGE_ACCOUNT', value: storage.name }
      { name: 'STORAGE_KEY', secureValue: storage.listKeys().keys[0].value }
    ]
    scriptContent: 'printf "%s" "$AIGW_CONFIG" > config.toml && az storage file upload --account-name "$STORAGE_ACCOUNT" --account-key "$STORAGE_KEY" --share-name aigw-config --source config.toml --path config.toml'
  }
}

// ---- Azure Managed Redis -------------------------------------------------------------------------

resource redis 'Microsoft.Cache/redisEnterprise@2024-09-01-preview' = {
  name: '${name}-redis'
  location: location
  tags: tags
  sku: { name: 'Balanced_B1' }
  properties: {
    minimumTlsVersion: '1.2'
  }
}

resource redisDb 'Microsoft.Cache/redisEnterprise/databases@2024-09-01-preview' = {
  parent: redis
  name: 'default'
  properties: {
    clientProtocol: 'Encrypted'
    port: 10000
    // Azure Managed Redis's OSS cluster policy: clients talk to every shard (MOVED/ASK).
    clusteringPolicy: 'OSSCluster'
    // The ledger's money records and the limit counters must never be evicted.
    evictionPolicy: 'NoEviction'
    // The ledger lives here: append-only file, fsync every second.
    persistence: {
      aofEnabled: true
      aofFrequency: '1s'
    }
    // Entra ID only: no access keys to leak.
    accessKeysAuthentication: 'Disabled'
  }
}

// ---- App Service -----------------------------------------------------------------------------------

resource plan 'Microsoft.Web/serverfarms@2023-12-01' = {
  name: '${name}-plan'
  location: location
  tags: tags
  kind: 'linux'
  sku: {
    name: 'P0v3'
    tier: 'Premium0V3'
    capacity: 3
  }
  properties: {
    reserved: true // Linux
  }
}

var appSettings = [
  // The image listens on 8080 (AIGW_LISTEN in infra/Dockerfile).
  { name: 'WEBSITES_PORT', value: '8080' }
  // Nothing of the app's lives in /home; the config comes from the Azure Files mount.
  { name: 'WEBSITES_ENABLE_APP_SERVICE_STORAGE', value: 'false' }
  // Instances failing /ready this many times in a row are taken out of the load balancer.
  { name: 'WEBSITE_HEALTHCHECK_MAXPINGFAILURES', value: '3' }
  { name: 'RUST_LOG', value: 'info' }
  { name: 'AIGW_REDIS_URL', value: 'rediss://${redis.properties.hostName}:${redisDb.properties.port}' }
  { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: insights.properties.ConnectionString }
  { name: 'OTEL_SERVICE_NAME', value: 'aigw' }
  { name: 'OTEL_METRICS_EXPORTER', value: empty(otlpEndpoint) ? 'none' : 'otlp' }
  { name: 'OTEL_EXPORTER_OTLP_ENDPOINT', value: otlpEndpoint }
  { name: 'OTEL_EXPORTER_OTLP_PROTOCOL', value: 'http/protobuf' }
  // Application Insights sums per-interval values (see the README's KQL).
  { name: 'OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE', value: 'delta' }
]

var siteConfig = {
  // A placeholder until `azd deploy` sets the image it built and pushed.
  linuxFxVersion: 'DOCKER|mcr.microsoft.com/appsvc/staticsite:latest'
  acrUseManagedIdentityCreds: true
  acrUserManagedIdentityID: pullIdentity.properties.clientId
  alwaysOn: true
  // 503 while draining or while a dependency is down: the instance leaves the load balancer.
  healthCheckPath: '/ready'
  http20Enabled: true
  minTlsVersion: '1.2'
  ftpsState: 'Disabled'
  appSettings: appSettings
  azureStorageAccounts: {
    config: {
      type: 'AzureFiles'
      accountName: storage.name
      shareName: 'aigw-config'
      mountPath: '/etc/aigw'
      accessKey: storage.listKeys().keys[0].value
    }
  }
}

resource app 'Microsoft.Web/sites@2023-12-01' = {
  name: '${name}-gateway'
  location: location
  tags: union(tags, { 'azd-service-name': 'gateway' })
  kind: 'app,linux,container'
  identity: {
    type: 'SystemAssigned, UserAssigned'
    userAssignedIdentities: { '${pullIdentity.id}': {} }
  }
  dependsOn: [acrPull, writeConfig]
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    // Any instance answers any request: no ARR affinity cookie.
    clientAffinityEnabled: false
    siteConfig: siteConfig
  }
}

// Same plan, same container and config: deploy here, warm up, then swap.
resource staging 'Microsoft.Web/sites/slots@2023-12-01' = {
  parent: app
  name: 'staging'
  location: location
  tags: tags
  kind: 'app,linux,container'
  identity: {
    type: 'SystemAssigned, UserAssigned'
    userAssignedIdentities: { '${pullIdentity.id}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientAffinityEnabled: false
    siteConfig: siteConfig
  }
}

// The gateway's stdout (one JSON line per request) and platform logs into Log Analytics.
resource appLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: app
  properties: {
    workspaceId: logs.id
    logs: [
      { category: 'AppServiceConsoleLogs', enabled: true }
      { category: 'AppServicePlatformLogs', enabled: true }
      { category: 'AppServiceHTTPLogs', enabled: true }
    ]
    metrics: [{ category: 'AllMetrics', enabled: true }]
  }
}

// Data access to Redis for the app's and the slot's identities (Entra ID; object id as user name).
resource redisAccessApp 'Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments@2024-09-01-preview' = {
  parent: redisDb
  name: 'aigwapp'
  properties: {
    accessPolicyName: 'default'
    user: { objectId: app.identity.principalId }
  }
}

resource redisAccessStaging 'Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments@2024-09-01-preview' = {
  parent: redisDb
  name: 'aigwstaging'
  dependsOn: [redisAccessApp] // one access policy change at a time
  properties: {
    accessPolicyName: 'default'
    user: { objectId: staging.identity.principalId }
  }
}

output url string = 'https://${app.properties.defaultHostName}'
output stagingUrl string = 'https://${staging.properties.defaultHostName}'
output appPrincipalId string = app.identity.principalId
output stagingPrincipalId string = staging.identity.principalId
output registryLoginServer string = registry.properties.loginServer
output redisHost string = redis.properties.hostName
