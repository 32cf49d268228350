{{/* Names and labels, defined once. */}}

{{- define "fabric-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fabric-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fabric-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fabric-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fabric-operator.gatewaySelectorLabels" -}}
app.kubernetes.io/name: fabric-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fabric-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fabric-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "fabric-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fabric-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The rules the operator needs, and nothing more (see README "Permissions"). */}}
{{- define "fabric-operator.rules" -}}
- apiGroups: ["llm.fabric.dev"]
  resources: ["llmbackends"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["llm.fabric.dev"]
  resources: ["llmbackends/status"]
  verbs: ["patch"]
- apiGroups: ["llm.fabric.dev"]
  resources: ["llmbackends/scale"]
  verbs: ["patch"]
- apiGroups: ["llm.fabric.dev"]
  resources: ["llmbackends/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* The gateway only reads: backends, their Endpoints, and keys (see README "Tenancy and
security"). Secrets: list/watch for the key Secrets (by label; RBAC cannot restrict a list
to a label, so this is every Secret of a namespace it serves) and get for each backend's
own apiKeySecretRef. */}}
{{- define "fabric-operator.gatewayRules" -}}
- apiGroups: ["llm.fabric.dev"]
  resources: ["llmbackends"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["endpoints"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/* In its own namespace, when it serves it not: the admin's key Secrets only. */}}
{{- define "fabric-operator.gatewayKeyRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["list", "watch"]
{{- end }}
