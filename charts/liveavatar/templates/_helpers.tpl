{{/*
Shared helpers. Component templates call these with `(dict "ctx" $ ...)` so the root context stays reachable.
*/}}

{{/* Chart name, truncated to a DNS label. */}}
{{- define "liveavatar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped prefix of every resource name (kept short: lane names append "-lane-<pool>"). */}}
{{- define "liveavatar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's resources: <fullname>-<component>. Args: ctx, component. */}}
{{- define "liveavatar.componentName" -}}
{{- printf "%s-%s" (include "liveavatar.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels on every resource. Args: ctx, component. */}}
{{- define "liveavatar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "liveavatar.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: liveavatar
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Immutable selector labels. Args: ctx, component. */}}
{{- define "liveavatar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "liveavatar.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* metadata.annotations block from commonAnnotations (renders nothing when empty). Args: ctx. */}}
{{- define "liveavatar.commonAnnotations" -}}
{{- with .ctx.Values.commonAnnotations -}}
{{- printf "annotations:\n%s" (toYaml . | indent 2) | nindent 2 -}}
{{- end -}}
{{- end -}}

{{/* Full image reference. Args: ctx, image (values with registry/repository/tag/digest). */}}
{{- define "liveavatar.image" -}}
{{- $registry := default .ctx.Values.global.imageRegistry .image.registry -}}
{{- $repo := .image.repository -}}
{{- if $registry }}{{ $repo = printf "%s/%s" (trimSuffix "/" $registry) $repo }}{{ end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (toString (default .ctx.Chart.AppVersion .image.tag)) -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets of a pod spec, with a leading newline (nothing when none). Args: ctx, indent. */}}
{{- define "liveavatar.imagePullSecrets" -}}
{{- with .ctx.Values.global.imagePullSecrets -}}
{{- $items := list -}}
{{- range . }}{{ $items = append $items (dict "name" .) }}{{ end -}}
{{- dict "imagePullSecrets" $items | toYaml | nindent (int $.indent) -}}
{{- end -}}
{{- end -}}

{{/* Name of the ConfigMap with the non-secret LIVEAVATAR_* settings. */}}
{{- define "liveavatar.configName" -}}
{{- include "liveavatar.componentName" (dict "ctx" . "component" "config") -}}
{{- end -}}

{{/* Name of the chart-managed Secret (Redis URL and/or inline SASL password). */}}
{{- define "liveavatar.secretName" -}}
{{- include "liveavatar.componentName" (dict "ctx" . "component" "credentials") -}}
{{- end -}}

{{/* Kafka bootstrap servers actually used (the embedded broker's Service when it is enabled). */}}
{{- define "liveavatar.kafka.bootstrap" -}}
{{- if .Values.kafka.embedded.enabled -}}
{{- printf "%s:9092" (include "liveavatar.componentName" (dict "ctx" . "component" "kafka")) -}}
{{- else -}}
{{- .Values.kafka.bootstrapServers -}}
{{- end -}}
{{- end -}}

{{/* "true" when the Kafka protocol uses SASL. */}}
{{- define "liveavatar.kafka.sasl" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}true{{ end -}}
{{- end -}}

{{/* Secret name + key of the SASL password. */}}
{{- define "liveavatar.kafka.passwordSecret" -}}
{{- if .Values.kafka.sasl.existingSecret -}}
{{- .Values.kafka.sasl.existingSecret -}}
{{- else -}}
{{- include "liveavatar.secretName" . -}}
{{- end -}}
{{- end -}}
{{- define "liveavatar.kafka.passwordKey" -}}
{{- if .Values.kafka.sasl.existingSecret -}}
{{- .Values.kafka.sasl.existingSecretPasswordKey -}}
{{- else -}}
kafka-sasl-password
{{- end -}}
{{- end -}}

{{/* Secret name + key of the Redis URL. */}}
{{- define "liveavatar.redis.urlSecret" -}}
{{- if and .Values.redis.existingSecret (not .Values.redis.embedded.enabled) -}}
{{- .Values.redis.existingSecret -}}
{{- else -}}
{{- include "liveavatar.secretName" . -}}
{{- end -}}
{{- end -}}
{{- define "liveavatar.redis.urlKey" -}}
{{- if and .Values.redis.existingSecret (not .Values.redis.embedded.enabled) -}}
{{- .Values.redis.existingSecretUrlKey -}}
{{- else -}}
redis-url
{{- end -}}
{{- end -}}

{{/* Redis URL the chart stores in its own Secret. */}}
{{- define "liveavatar.redis.url" -}}
{{- if .Values.redis.embedded.enabled -}}
{{- printf "redis://%s:6379/0" (include "liveavatar.componentName" (dict "ctx" . "component" "redis")) -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* "true" when the chart must create its credentials Secret. */}}
{{- define "liveavatar.needsSecret" -}}
{{- $redis := or .Values.redis.embedded.enabled (not .Values.redis.existingSecret) -}}
{{- $sasl := and (include "liveavatar.kafka.sasl" .) (not .Values.kafka.sasl.existingSecret) -}}
{{- if or $redis $sasl }}true{{ end -}}
{{- end -}}

{{/*
Checks that JSON schema cannot express. Fails the render with a message naming the value.
*/}}
{{- define "liveavatar.validate" -}}
{{- $v := .Values -}}
{{- if and $v.kafka.topics.strimzi.enabled $v.kafka.topics.job.enabled -}}
{{- fail "kafka.topics.strimzi.enabled and kafka.topics.job.enabled are exclusive: choose one way to create the topics" -}}
{{- end -}}
{{- if and $v.kafka.embedded.enabled (ne $v.kafka.securityProtocol "PLAINTEXT") -}}
{{- fail "kafka.embedded.enabled supports only kafka.securityProtocol=PLAINTEXT" -}}
{{- end -}}
{{- if and $v.kafka.embedded.enabled $v.kafka.topics.strimzi.enabled -}}
{{- fail "kafka.topics.strimzi.enabled needs a Strimzi-managed cluster, not kafka.embedded" -}}
{{- end -}}
{{- if include "liveavatar.kafka.sasl" . -}}
{{- if not $v.kafka.sasl.mechanism -}}
{{- fail (printf "kafka.sasl.mechanism is required with kafka.securityProtocol=%s" $v.kafka.securityProtocol) -}}
{{- end -}}
{{- if not $v.kafka.sasl.username -}}
{{- fail (printf "kafka.sasl.username is required with kafka.securityProtocol=%s" $v.kafka.securityProtocol) -}}
{{- end -}}
{{- if and (not $v.kafka.sasl.existingSecret) (not $v.kafka.sasl.password) -}}
{{- fail "kafka.sasl.existingSecret (or kafka.sasl.password) is required with a SASL security protocol" -}}
{{- end -}}
{{- end -}}
{{- if and (not $v.redis.embedded.enabled) (not $v.redis.existingSecret) (not $v.redis.url) -}}
{{- fail "redis.url or redis.existingSecret is required unless redis.embedded.enabled" -}}
{{- end -}}
{{- if and $v.audioEncoder.triton.enabled (not $v.models.existingClaim) (not $v.models.hostPath) -}}
{{- fail "audioEncoder.triton.enabled needs the model repository on models.existingClaim or models.hostPath" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $pool := $v.lanePools -}}
{{- if hasKey $seen $pool.name -}}
{{- fail (printf "lanePools[%d].name %q is used twice; pool names must be unique" $i $pool.name) -}}
{{- end -}}
{{- $_ := set $seen $pool.name true -}}
{{- if lt (int $pool.max) (int $pool.min) -}}
{{- fail (printf "lanePools[%d] (%s): max (%d) must be >= min (%d)" $i $pool.name (int $pool.max) (int $pool.min)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Environment shared by every LiveAvatar container: non-secret settings from the ConfigMap, secrets by
reference only (never as plain `value:`). Args: ctx.
*/}}
{{- define "liveavatar.env" -}}
- name: LIVEAVATAR_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "liveavatar.redis.urlSecret" .ctx }}
      key: {{ include "liveavatar.redis.urlKey" .ctx }}
{{- if include "liveavatar.kafka.sasl" .ctx }}
- name: LIVEAVATAR_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "liveavatar.kafka.passwordSecret" .ctx }}
      key: {{ include "liveavatar.kafka.passwordKey" .ctx }}
{{- end }}
{{- end -}}

{{/* envFrom with the shared ConfigMap. Args: ctx. */}}
{{- define "liveavatar.envFrom" -}}
- configMapRef:
    name: {{ include "liveavatar.configName" .ctx }}
{{- end -}}

{{/* Volume mounts shared by every LiveAvatar container. Args: ctx, models (bool). */}}
{{- define "liveavatar.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .ctx.Values.kafka.tls.existingSecret }}
- name: kafka-ca
  mountPath: /etc/liveavatar/kafka-ca
  readOnly: true
{{- end }}
{{- if .ctx.Values.redis.tls.existingSecret }}
- name: redis-ca
  mountPath: /etc/liveavatar/redis-ca
  readOnly: true
{{- end }}
{{- if .models }}
- name: models
  mountPath: /models
  readOnly: true
{{- end }}
{{- end -}}

{{/* Volumes matching liveavatar.volumeMounts. Args: ctx, models (bool). */}}
{{- define "liveavatar.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 2Gi
{{- if .ctx.Values.kafka.tls.existingSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .ctx.Values.kafka.tls.existingSecret }}
    items:
      - key: {{ .ctx.Values.kafka.tls.caKey }}
        path: ca.crt
{{- end }}
{{- if .ctx.Values.redis.tls.existingSecret }}
- name: redis-ca
  secret:
    secretName: {{ .ctx.Values.redis.tls.existingSecret }}
    items:
      - key: {{ .ctx.Values.redis.tls.caKey }}
        path: ca.crt
{{- end }}
{{- if .models }}
{{ include "liveavatar.modelsVolume" .ctx }}
{{- end }}
{{- end -}}

{{/* The read-only model weights volume. */}}
{{- define "liveavatar.modelsVolume" -}}
- name: models
{{- if .Values.models.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.models.existingClaim }}
    readOnly: true
{{- else if .Values.models.hostPath }}
  hostPath:
    path: {{ .Values.models.hostPath }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: 1Gi
{{- end }}
{{- end -}}

{{/* HTTP probes on a named port. Args: values (component values), port (name). */}}
{{- define "liveavatar.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  initialDelaySeconds: {{ .values.livenessProbe.initialDelaySeconds }}
  periodSeconds: {{ .values.livenessProbe.periodSeconds }}
  timeoutSeconds: {{ .values.livenessProbe.timeoutSeconds }}
  failureThreshold: {{ .values.livenessProbe.failureThreshold }}
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ .port }}
  initialDelaySeconds: {{ .values.readinessProbe.initialDelaySeconds }}
  periodSeconds: {{ .values.readinessProbe.periodSeconds }}
  timeoutSeconds: {{ .values.readinessProbe.timeoutSeconds }}
  failureThreshold: {{ .values.readinessProbe.failureThreshold }}
startupProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  periodSeconds: {{ .values.startupProbe.periodSeconds }}
  timeoutSeconds: {{ .values.startupProbe.timeoutSeconds }}
  failureThreshold: {{ .values.startupProbe.failureThreshold }}
{{- end -}}

{{/* Pod-level settings shared by LiveAvatar Deployments. Args: ctx, values. */}}
{{- define "liveavatar.podSpecCommon" -}}
enableServiceLinks: false
{{- include "liveavatar.imagePullSecrets" (dict "ctx" .ctx "indent" 0) }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod template annotations: checksums roll pods when settings change. Args: ctx, values. */}}
{{- define "liveavatar.podAnnotations" -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/config/configmap.yaml") .ctx | sha256sum }}
checksum/credentials: {{ include (print .ctx.Template.BasePath "/config/secret.yaml") .ctx | sha256sum }}
{{- with .values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}
