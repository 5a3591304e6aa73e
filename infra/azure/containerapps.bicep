// The second option: aigw on Azure Container Apps (main.bicep deploys App Service, as the reference
// sample does). A Log Analytics workspace, a Container Apps environment, a user-assigned managed
// identity, and the gateway app (min 2 replicas, ingress on 8080, probes).
//
// This template sets no [redis]: each replica counts limits, caches and keeps its usage ledger
// (under the image's working directory, /var/lib/aigw, lost with the replica) on its own. Shared
// state needs a Redis the gateway can reach; Azure's need TLS, which the gateway lacks today.
//
//   az deployment group create -g my-rg -f infra/azure/containerapps.bicep \
//     -p image=myregistry.azurecr.io/aigw:0.1.0 \
//        azureOpenAiEndpoint=https://my-resource.openai.azure.com \
//        keyVaultName=my-vault
//
// Secrets live in Key Vault and are read by the managed identity (Key Vault references), so no
// secret value passes through this template. Expected vault secrets: `aoai-api-key` (the Azure
// OpenAI key; aigw authenticates to backends with an api-key header), `aigw-platform-key` (the
// platform subscription key) and `aigw-admin-key` (the admin API's key, for /admin/chargeback). The identity also pulls the image when `registryServer` is set.

targetScope = 'resourceGroup'

@description('Name prefix for all resources.')
@minLength(3)
@maxLength(20)
param name string = 'aigw'

param location string = resourceGroup().location

@description('Container image built from infra/Dockerfile, e.g. myregistry.azurecr.io/aigw:0.1.0.')
param image string

@description('Azure OpenAI resource endpoint the gateway fronts, e.g. https://my-resource.openai.azure.com.')
param azureOpenAiEndpoint string

@description('Key Vault (in this resource group, RBAC authorization) holding aoai-api-key, aigw-platform-key and aigw-admin-key.')
param keyVaultName string

@description('Azure Container Registry login server for the image (empty for a public image).')
param registryServer string = ''

@minValue(2)
param minReplicas int = 2

@minValue(2)
param maxReplicas int = 10

// In-flight streams get this long after SIGTERM (server.shutdown-grace-secs); the platform's
// termination grace period below is longer so a draining replica is never killed early.
var shutdownGraceSecs = 30
var terminationGraceSecs = shutdownGraceSecs + 15

// The gateway's configuration document, mounted as /etc/aigw/config.toml from an app secret.
var aigwConfig = '''
[server]
listen = "0.0.0.0:8080"
shutdown-grace-secs = {0}
request-log = true

[backends.aoai]
url = "{1}"
kind = "azure-openai"
auth = {{ type = "api-key", env = "AOAI_API_KEY" }}
timeout-secs = 300

[[subscriptions]]
id = "platform-admin"
name = "Platform team"
team = "platform"
apis = ["*"]
key-env = "AIGW_PLATFORM_KEY"

[admin]
key-env = "AIGW_ADMIN_KEY"

[apis.aoai]
kind = "openai"
backend = "aoai"
outbound = [
  {{ policy = "set-header", name = "x-aigw-subscription", value = "{{subscription.id}}" }},
]
'''

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${name}-logs'
  location: location
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
  }
}

resource environment 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: '${name}-env'
  location: location
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logs.properties.customerId
        sharedKey: logs.listKeys().primarySharedKey
      }
    }
    zoneRedundant: false
  }
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${name}-id'
  location: location
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

// Key Vault Secrets User: read secret values (for the Key Vault references below).
resource vaultSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, identity.id, '4633458b-17de-408a-b874-0445c86b69e6')
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '4633458b-17de-408a-b874-0445c86b69e6')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource app 'Microsoft.App/containerApps@2024-03-01' = {
  name: name
  location: location
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  dependsOn: [
    vaultSecretsUser // the references fail until the identity may read the vault
  ]
  properties: {
    managedEnvironmentId: environment.id
    configuration: {
      activeRevisionsMode: 'Single'
      ingress: {
        external: true
        targetPort: 8080
        transport: 'http'
        allowInsecure: false
      }
      registries: empty(registryServer) ? [] : [
        {
          server: registryServer
          identity: identity.id // needs AcrPull on the registry
        }
      ]
      secrets: [
        {
          name: 'aigw-config'
          value: format(aigwConfig, shutdownGraceSecs, azureOpenAiEndpoint)
        }
        {
          name: 'aoai-api-key'
          keyVaultUrl: '${vault.properties.vaultUri}secrets/aoai-api-key'
          identity: identity.id
        }
        {
          name: 'aigw-platform-key'
          keyVaultUrl: '${vault.properties.vaultUri}secrets/aigw-platform-key'
          identity: identity.id
        }
        {
          name: 'aigw-admin-key'
          keyVaultUrl: '${vault.properties.vaultUri}secrets/aigw-admin-key'
          identity: identity.id
        }
      ]
    }
    template: {
      terminationGracePeriodSeconds: terminationGraceSecs
      containers: [
        {
          name: 'aigw'
          image: image
          args: [ 'serve', '--config', '/etc/aigw/config.toml' ]
          env: [
            { name: 'AIGW_LISTEN', value: '0.0.0.0:8080' }
            { name: 'RUST_LOG', value: 'info' }
            { name: 'AOAI_API_KEY', secretRef: 'aoai-api-key' }
            { name: 'AIGW_PLATFORM_KEY', secretRef: 'aigw-platform-key' }
            { name: 'AIGW_ADMIN_KEY', secretRef: 'aigw-admin-key' }
          ]
          resources: {
            cpu: json('0.5')
            memory: '1Gi'
          }
          probes: [
            {
              type: 'Startup'
              httpGet: { path: '/health', port: 8080 }
              periodSeconds: 2
              failureThreshold: 15
            }
            {
              type: 'Liveness'
              httpGet: { path: '/health', port: 8080 }
              periodSeconds: 10
              timeoutSeconds: 2
              failureThreshold: 3
            }
            {
              // 503 while draining after SIGTERM, so the replica leaves the load balancer.
              type: 'Readiness'
              httpGet: { path: '/ready', port: 8080 }
              periodSeconds: 5
              timeoutSeconds: 2
              failureThreshold: 2
            }
          ]
          volumeMounts: [
            { volumeName: 'config', mountPath: '/etc/aigw' }
          ]
        }
      ]
      volumes: [
        {
          name: 'config'
          storageType: 'Secret'
          secrets: [
            { secretRef: 'aigw-config', path: 'config.toml' }
          ]
        }
      ]
      scale: {
        minReplicas: minReplicas
        maxReplicas: maxReplicas
        rules: [
          {
            name: 'http-concurrency'
            http: { metadata: { concurrentRequests: '200' } }
          }
        ]
      }
    }
  }
}

output url string = 'https://${app.properties.configuration.ingress.fqdn}'
output identityClientId string = identity.properties.clientId
output identityPrincipalId string = identity.properties.principalId
