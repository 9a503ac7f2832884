{{/* Names: <release>-snapreg unless the release is already called so. */}}
{{- define "snapreg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "snapreg.fullname" -}}
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

{{/* The registry's objects are called <fullname>; the agents' <fullname>-agent. */}}
{{- define "snapreg.agentName" -}}
{{- printf "%s-agent" (include "snapreg.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "snapreg.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "snapreg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: snapreg
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels: stable across upgrades (a selector cannot change). */}}
{{- define "snapreg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "snapreg.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "snapreg.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The registry URL the agents use. */}}
{{- define "snapreg.registryURL" -}}
{{- if .Values.agent.registry }}
{{- .Values.agent.registry }}
{{- else }}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.tls.enabled) (include "snapreg.fullname" .) .Release.Namespace (int .Values.registry.ports.grpc) }}
{{- end }}
{{- end }}

{{/*
Probes. Without TLS: kubelet's gRPC probe (grpc.health.v1 on the gRPC port). With
TLS: kubelet's gRPC probe cannot do TLS, so HTTP GETs of /livez and /readyz on the
metrics port, which stays plain HTTP. Called with dict root, kind (livez|readyz),
grpcPort, metricsPort, tls.
*/}}
{{- define "snapreg.probe" -}}
{{- if .tls -}}
httpGet:
  path: /{{ .kind }}
  port: {{ .metricsPort }}
{{- else -}}
grpc:
  port: {{ .grpcPort }}
{{- end }}
{{- end }}

{{/* The SNAPCTL_* environment both node containers share. */}}
{{- define "snapreg.agentEnv" -}}
{{- $a := .Values.agent }}
{{- $tls := .Values.tls -}}
- name: SNAPCTL_NODE
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: SNAPCTL_REGISTRY
  value: {{ include "snapreg.registryURL" . | quote }}
- name: SNAPCTL_CACHE
  value: {{ $a.cacheDir | quote }}
- name: SNAPCTL_CACHE_SIZE
  value: {{ $a.cacheSize | quote }}
- name: SNAPCTL_LOG_FORMAT
  value: {{ $a.logFormat | quote }}
- name: SNAPCTL_CRIU
  value: /opt/snapreg-criu/bin/criu
- name: SNAPCTL_WEIGHTS_SOCKET
  value: "{{ $a.weights.socketDir }}/weights.sock"
- name: TMPDIR
  value: {{ $a.workDir | quote }}
{{- if and $a.memorySpool.enabled $a.memorySpool.hugePages }}
- name: SNAPCTL_SPOOL_HUGE_PAGES
  value: "true"
{{- end }}
{{- with $a.zone }}
- name: SNAPCTL_ZONE
  value: {{ . | quote }}
{{- end }}
{{- with $a.region }}
- name: SNAPCTL_REGION
  value: {{ . | quote }}
{{- end }}
{{- if $a.tokenSecret.name }}
- name: SNAPCTL_TOKEN_FILE
  value: /etc/snapctl/token/token
{{- end }}
{{- if $tls.enabled }}
- name: SNAPCTL_CA_CERT
  value: /etc/snapctl/tls/ca.crt
{{- if $tls.mutual }}
- name: SNAPCTL_CLIENT_CERT
  value: /etc/snapctl/tls/tls.crt
- name: SNAPCTL_CLIENT_KEY
  value: /etc/snapctl/tls/tls.key
{{- end }}
{{- end }}
{{- range $k, $v := $a.extraEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}

{{/* The host folders and Secrets both node containers mount. */}}
{{- define "snapreg.agentMounts" -}}
{{- $a := .Values.agent -}}
- name: cache
  mountPath: {{ $a.cacheDir }}
- name: work
  mountPath: {{ $a.workDir }}
- name: tmp
  mountPath: /tmp
{{- if $a.memorySpool.enabled }}
- name: memory-spool
  mountPath: /dev/shm
{{- end }}
{{- with $a.criSocketDir }}
- name: cri
  mountPath: {{ . }}
{{- end }}
{{- if $a.tokenSecret.name }}
- name: token
  mountPath: /etc/snapctl/token
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/snapctl/tls
  readOnly: true
{{- end }}
{{- end }}
