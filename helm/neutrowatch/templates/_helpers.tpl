{{/* Names and labels. */}}
{{- define "neutrowatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "neutrowatch.fullname" -}}
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

{{- define "neutrowatch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "neutrowatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "neutrowatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "neutrowatch.labels" -}}
helm.sh/chart: {{ include "neutrowatch.chart" . }}
{{ include "neutrowatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: neutrowatch
{{- end }}

{{- define "neutrowatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "neutrowatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "neutrowatch.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Fixed in-container paths. */}}
{{- define "neutrowatch.dataDir" -}}/var/lib/neutrowatch{{- end }}
{{- define "neutrowatch.secretDir" -}}/var/run/secrets/neutrowatch{{- end }}
{{- define "neutrowatch.configPath" -}}/etc/neutrowatch/config.yaml{{- end }}
{{- define "neutrowatch.conceptMapDir" -}}/etc/neutrowatch/conceptmaps{{- end }}

{{/* True (non-empty) when ConceptMap files are mounted from conceptMaps.configMap. */}}
{{- define "neutrowatch.conceptMapsMounted" -}}
{{- if and .Values.conceptMaps.configMap .Values.conceptMaps.keys }}true{{- end }}
{{- end }}

{{/* The port of /healthz, /readyz and /metrics: config.web.port, 8080 by default. */}}
{{- define "neutrowatch.port" -}}
{{- dig "web" "port" 8080 (.Values.config | default dict) | int }}
{{- end }}

{{/* The SQLite state file: config.store.path, on the data volume by default. */}}
{{- define "neutrowatch.storePath" -}}
{{- dig "store" "path" "/var/lib/neutrowatch/state.sqlite3" (.Values.config | default dict) }}
{{- end }}

{{- define "neutrowatch.backend" -}}
{{- dig "store" "backend" "sqlite" (.Values.config | default dict) }}
{{- end }}

{{/* True (non-empty) when the Secret is referenced for at least one key. */}}
{{- define "neutrowatch.secretMounted" -}}
{{- $k := .Values.existingSecret.keys }}
{{- if and .Values.existingSecret.name (or $k.bearerToken $k.smartPrivateKey $k.dsn $k.pseudonymKey) }}true{{- end }}
{{- end }}

{{/*
The rendered service configuration: values `config` plus what the chart owns — the secret file paths for
the keys of existingSecret, and store.path (defaulted onto the data volume). The paths go into the file,
not into NEUTROWATCH_* variables, so config.yaml is the whole configuration: `check-config` on it, the
ConfigMap and the checksum all see what the service sees.
*/}}
{{- define "neutrowatch.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $dir := include "neutrowatch.secretDir" . }}
{{- $keys := .Values.existingSecret.keys }}
{{- $overlay := dict "store" (dict "path" (include "neutrowatch.storePath" .)) }}
{{- if and .Values.existingSecret.name $keys.bearerToken }}
{{- $_ := mergeOverwrite $overlay (dict "fhir" (dict "auth" (dict "bearer_token_file" (printf "%s/bearer-token" $dir)))) }}
{{- end }}
{{- if and .Values.existingSecret.name $keys.smartPrivateKey }}
{{- $_ := mergeOverwrite $overlay (dict "fhir" (dict "auth" (dict "smart" (dict "private_key_file" (printf "%s/smart-private-key.pem" $dir))))) }}
{{- end }}
{{- if and .Values.existingSecret.name $keys.dsn }}
{{- $_ := mergeOverwrite $overlay (dict "store" (dict "dsn_file" (printf "%s/dsn" $dir))) }}
{{- end }}
{{- if and .Values.existingSecret.name $keys.pseudonymKey }}
{{- $_ := mergeOverwrite $overlay (dict "logging" (dict "pseudonym_key_file" (printf "%s/pseudonym-key" $dir))) }}
{{- end }}
{{- if include "neutrowatch.conceptMapsMounted" . }}
{{- $maps := list }}
{{- range .Values.conceptMaps.keys }}
{{- $maps = append $maps (printf "%s/%s" (include "neutrowatch.conceptMapDir" $) .) }}
{{- end }}
{{- $_ := mergeOverwrite $overlay (dict "terminology" (dict "concept_maps" $maps)) }}
{{- end }}
{{- toYaml (mergeOverwrite $cfg $overlay) }}
{{- end }}
