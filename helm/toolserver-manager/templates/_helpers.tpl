{{/*
Names and labels. Every object's name and labels come from here.
*/}}

{{/* The chart name, cut to 63 characters (DNS label limit). */}}
{{- define "toolserver-manager.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: release-chart, or the release name alone when it already contains the chart
name; cut to 63 characters.
*/}}
{{- define "toolserver-manager.fullname" -}}
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

{{/* chart-version, as the helm.sh/chart label. */}}
{{- define "toolserver-manager.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the managers. */}}
{{- define "toolserver-manager.labels" -}}
helm.sh/chart: {{ include "toolserver-manager.chart" . }}
{{ include "toolserver-manager.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/component: manager
app.kubernetes.io/part-of: toolserver-manager
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels: name and instance only (immutable once deployed). */}}
{{- define "toolserver-manager.selectorLabels" -}}
app.kubernetes.io/name: {{ include "toolserver-manager.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The bundled Redis has its own app.kubernetes.io/name (<name>-redis), so that its selector is
also name+instance only and never overlaps the managers'.
*/}}
{{- define "toolserver-manager.redis.fullname" -}}
{{- printf "%s-redis" (include "toolserver-manager.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "toolserver-manager.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-redis" (include "toolserver-manager.name" . | trunc 57 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "toolserver-manager.redis.labels" -}}
helm.sh/chart: {{ include "toolserver-manager.chart" . }}
{{ include "toolserver-manager.redis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.redis.bundled.image.tag | quote }}
app.kubernetes.io/component: redis
app.kubernetes.io/part-of: toolserver-manager
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The ServiceAccount the managers run as. */}}
{{- define "toolserver-manager.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "toolserver-manager.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the tokens. */}}
{{- define "toolserver-manager.secretName" -}}
{{- default (include "toolserver-manager.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "toolserver-manager.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Whether pods drive their host's Docker engine (always in daemonset mode). */}}
{{- define "toolserver-manager.hostSocket" -}}
{{- if and (not .Values.docker.dind.enabled) (or (eq .Values.mode "daemonset") .Values.docker.hostSocket.enabled) }}true{{ end }}
{{- end }}

{{/* Whether each pod runs its own engine, a Docker-in-Docker sidecar (clusters without Docker on the hosts). */}}
{{- define "toolserver-manager.dind" -}}
{{- if .Values.docker.dind.enabled }}true{{ end }}
{{- end }}

{{/* The uid and gid the manager runs as (the image's 10001 unless podSecurityContext says otherwise). */}}
{{- define "toolserver-manager.uid" -}}
{{- .Values.podSecurityContext.runAsUser | default 10001 | int }}
{{- end }}
{{- define "toolserver-manager.gid" -}}
{{- .Values.podSecurityContext.runAsGroup | default 10001 | int }}
{{- end }}

{{/*
Whether the manager starts as root only to take the host socket's group, whatever its GID on
that host, then runs as its uid (docker.hostSocket.group: auto, without hostIsolation's root).
*/}}
{{- define "toolserver-manager.socketGroupDrop" -}}
{{- if and (include "toolserver-manager.hostSocket" .) (not (include "toolserver-manager.hostIsolation" .)) (eq (toString .Values.docker.hostSocket.group) "auto") }}true{{ end }}
{{- end }}

{{/* The manager runs with the host privileges its isolation needs (loop devices, host firewall). */}}
{{- define "toolserver-manager.hostIsolation" -}}
{{- if and (include "toolserver-manager.hostSocket" .) .Values.hostIsolation.enabled }}true{{ end }}
{{- end }}

{{/* manager_id in the file: config.manager_id, or the full name (per pod: the node name with the host socket). */}}
{{- define "toolserver-manager.managerId" -}}
{{- default (include "toolserver-manager.fullname" .) .Values.config.manager_id }}
{{- end }}

{{/* "true" when the managers read a Redis password from the Secret (always for the bundled Redis). */}}
{{- define "toolserver-manager.redisAuth" -}}
{{- if or (eq .Values.redis.mode "bundled") .Values.secrets.redisPassword .Values.redis.passwordFromSecret }}true{{- end }}
{{- end }}

{{/* Where the Secret's files are mounted. */}}
{{- define "toolserver-manager.secretsDir" -}}
/etc/toolserver-manager/secrets
{{- end }}

{{/*
manager.yml: .Values.config key for key, with what the chart owns filled in (see values.yaml).
*/}}
{{- define "toolserver-manager.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- if not $cfg.version }}
{{- $_ := unset $cfg "version" }}
{{- end }}
{{- $_ := set $cfg "manager_id" (include "toolserver-manager.managerId" .) }}
{{- if eq .Values.redis.mode "bundled" }}
{{- $_ := set $cfg.redis "url" (printf "redis://%s:6379/0" (include "toolserver-manager.redis.fullname" .)) }}
{{- $_ := set $cfg.redis "sentinels" list }}
{{- end }}
{{- $dir := include "toolserver-manager.secretsDir" . }}
{{- $_ := set $cfg.admin "token" "" }}
{{- $_ := set $cfg.admin "token_file" (printf "%s/%s" $dir .Values.secrets.adminTokenKey) }}
{{- $_ := set $cfg.cluster "internal_token" "" }}
{{- $_ := set $cfg.cluster "internal_token_file" (printf "%s/%s" $dir .Values.secrets.internalTokenKey) }}
{{- $_ := set $cfg.cluster "node_secret_key" "" }}
{{- $_ := set $cfg.cluster "node_secret_key_file" (printf "%s/%s" $dir .Values.secrets.nodeSecretKeyKey) }}
{{- if include "toolserver-manager.redisAuth" . }}
{{- $_ := set $cfg.redis "password_file" (printf "%s/%s" $dir .Values.secrets.redisPasswordKey) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
A token: the value given, else the one already in the release's Secret (kept on upgrade),
else a new random one. Arguments: (list $ valueKey secretKey).
*/}}
{{- define "toolserver-manager.token" -}}
{{- $root := index . 0 }}
{{- $value := index . 1 }}
{{- $key := index . 2 }}
{{- if $value }}
{{- $value | b64enc }}
{{- else }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (include "toolserver-manager.fullname" $root) }}
{{- if and $existing $existing.data (hasKey $existing.data $key) }}
{{- index $existing.data $key }}
{{- else }}
{{- randAlphaNum 40 | b64enc }}
{{- end }}
{{- end }}
{{- end }}
