{{/* Names: <release>-traffic-color unless the release name already says it. */}}
{{- define "traffic-color.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "traffic-color.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "traffic-color.webhookName" -}}
{{- printf "%s-webhook" (include "traffic-color.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "traffic-color.tlsSecret" -}}
{{- printf "%s-tls" (include "traffic-color.webhookName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "traffic-color.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "traffic-color.baseLabels" -}}
app.kubernetes.io/name: {{ include "traffic-color.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object, without the component. */}}
{{- define "traffic-color.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "traffic-color.baseLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "traffic-color.selectorLabels" -}}
{{ include "traffic-color.baseLabels" . }}
app.kubernetes.io/component: webhook
{{- end -}}

{{- define "traffic-color.labels" -}}
{{ include "traffic-color.commonLabels" . }}
app.kubernetes.io/component: webhook
{{- end -}}

{{/* DNS names the serving certificate must cover. */}}
{{- define "traffic-color.dnsNames" -}}
{{- $svc := include "traffic-color.webhookName" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.injection.clusterDomain) | toJson -}}
{{- end -}}

{{/* Labels of the node agent's objects and its pod selector. */}}
{{- define "traffic-color.nodeAgentName" -}}
{{- printf "%s-node" (include "traffic-color.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "traffic-color.nodeAgentSelectorLabels" -}}
{{ include "traffic-color.baseLabels" . }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{- define "traffic-color.nodeAgentLabels" -}}
{{ include "traffic-color.commonLabels" . }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{/*
Whether the pods' policy loads the kernel data path: injection.datapath, or
with "auto" the chart's own policy (policy.content's datapath.enabled).
*/}}
{{- define "traffic-color.podDatapath" -}}
{{- $dp := .Values.injection.datapath -}}
{{- if eq (toString $dp) "auto" -}}
{{- $policy := fromYaml .Values.policy.content -}}
{{- $dp = and .Values.policy.create (dig "datapath" "enabled" false $policy) -}}
{{- end -}}
{{- ternary "true" "false" (eq (toString $dp) "true") -}}
{{- end -}}

{{/* The injection settings the webhook reads (--config); keys match InjectConfig. */}}
{{- define "traffic-color.injectConfig" -}}
{{- $inj := .Values.injection -}}
{{- $capture := $inj.capture -}}
{{- dict
  "image" (include "traffic-color.image" .)
  "imagePullPolicy" .Values.image.pullPolicy
  "defaultColor" $inj.defaultColor
  "policyConfigMap" $inj.policyConfigMap
  "nativeSidecar" $inj.nativeSidecar
  "kubeVersion" (default .Capabilities.KubeVersion.Version $inj.kubeVersion)
  "capture" $capture.enabled
  "excludeOutboundPorts" $capture.excludeOutboundPorts
  "excludeOutboundCidrs" $capture.excludeOutboundCidrs
  "includeOutboundCidrs" $capture.includeOutboundCidrs
  "excludeInboundPorts" $capture.excludeInboundPorts
  "captureResources" $capture.resources
  "proxyEnv" $inj.proxyEnv.enabled
  "clusterDomain" $inj.clusterDomain
  "bypassClusterDomain" $inj.proxyEnv.bypassClusterDomain
  "noProxyExtra" $inj.proxyEnv.noProxyExtra
  "datapath" (eq (include "traffic-color.podDatapath" .) "true")
  "datapathCapabilities" $inj.datapathCapabilities
  "nodeAgent" .Values.nodeAgent.enabled
  "mergeMetrics" $inj.mergeMetrics
  "resources" $inj.resources
  "datapathResources" $inj.datapathResources
  | toPrettyJson -}}
{{- end -}}
