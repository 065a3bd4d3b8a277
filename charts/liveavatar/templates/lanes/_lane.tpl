{{/*
Lane helpers. A lane is one TPP pipeline of shape `lanes.shape`: `D+1` is D denoising ranks (4/D sampling
steps each) + 1 VAE decoder rank, `D` is D denoising ranks whose last one also decodes; one LeaderWorkerSet
group, one pod (and GPU) per rank. LWS injects LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and LWS_WORKER_INDEX at
the head of each container's env, so later entries may reference them with $(VAR).
Rank 0 (the leader) runs the first steps and is the lane head; the last rank decodes.
*/}}

{{/* Denoising ranks of a lane: the D of lanes.shape. Args: the root context. */}}
{{- define "liveavatar.lane.denoisers" -}}
{{- $shape := toString .Values.lanes.shape -}}
{{- if not (regexMatch "^(1|2|4)(\\+1)?$" $shape) -}}
{{- fail (printf "lanes.shape %q: write D+1 or D with D in 1, 2, 4 (e.g. 4+1, 2+1, 2, 1)" $shape) -}}
{{- end -}}
{{- trimSuffix "+1" $shape -}}
{{- end -}}

{{/* Pods of one lane (the LeaderWorkerSet size): D, plus 1 when the decoder has its own. Args: the root context. */}}
{{- define "liveavatar.lane.size" -}}
{{- $d := int (include "liveavatar.lane.denoisers" .) -}}
{{- ternary (add $d 1) $d (hasSuffix "+1" (toString .Values.lanes.shape)) -}}
{{- end -}}

{{/* LeaderWorkerSet name of a pool. Args: ctx, pool. */}}
{{- define "liveavatar.lane.name" -}}
{{- $name := printf "%s-lane-%s" (include "liveavatar.fullname" .ctx) .pool.name -}}
{{- /* LWS derives StatefulSet and pod names (<name>-<group>-<rank>) and revision labels from it. */ -}}
{{- if gt (len $name) 45 -}}
{{- fail (printf "lane pool %q: LeaderWorkerSet name %q is longer than 45 characters; shorten the release name, fullnameOverride or the pool name" .pool.name $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/* Labels that pick the pods of one pool. Args: ctx, pool. */}}
{{- define "liveavatar.lane.poolSelector" -}}
{{ include "liveavatar.selectorLabels" (dict "ctx" .ctx "component" "lane") }}
liveavatar.io/lane-pool: {{ .pool.name }}
{{- end -}}

{{/* Pod template of a lane pod. Args: ctx, pool, role ("leader" or "worker"). */}}
{{- define "liveavatar.lane.podTemplate" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values.lanes -}}
{{- $pool := .pool -}}
{{- $gpu := $ctx.Values.gpu -}}
metadata:
  labels:
    {{- include "liveavatar.labels" (dict "ctx" $ctx "component" "lane") | nindent 4 }}
    liveavatar.io/lane-pool: {{ $pool.name }}
    liveavatar.io/tenant: {{ $pool.tenant | quote }}
    liveavatar.io/lane-role: {{ .role }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- include "liveavatar.podAnnotations" (dict "ctx" $ctx "values" $v) | nindent 4 }}
spec:
  enableServiceLinks: false
  automountServiceAccountToken: false
  {{- include "liveavatar.imagePullSecrets" (dict "ctx" $ctx "indent" 2) }}
  securityContext:
    {{- toYaml $ctx.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  {{- with (default $v.priorityClassName $pool.priorityClassName) }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- $sel := dict }}
  {{- if $gpu.enabled }}
  {{- $_ := set $sel $gpu.productLabel (default $gpu.product $pool.gpuProduct) }}
  {{- end }}
  {{- $sel = merge $sel (default (dict) $pool.nodeSelector) (default (dict) $v.nodeSelector) }}
  {{- with $sel }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tol := concat (default (list) $v.tolerations) (default (list) $pool.tolerations) }}
  {{- if $gpu.enabled }}
  {{- $tol = concat $tol $gpu.tolerations }}
  {{- end }}
  {{- with $tol }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: lane
      image: {{ include "liveavatar.image" (dict "ctx" $ctx "image" $v.image) | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      securityContext:
        {{- toYaml $ctx.Values.containerSecurityContext | nindent 8 }}
      ports:
        - name: http
          containerPort: 8080
          protocol: TCP
        - name: dist
          containerPort: {{ $v.distPort }}
          protocol: TCP
      envFrom:
        {{- include "liveavatar.envFrom" (dict "ctx" $ctx) | nindent 8 }}
      env:
        {{- include "liveavatar.env" (dict "ctx" $ctx) | nindent 8 }}
        - name: LIVEAVATAR_HEALTH_HOST
          value: "0.0.0.0"
        - name: LIVEAVATAR_MODEL_CONFIG
          value: {{ $ctx.Values.config.modelConfig | quote }}
        - name: LIVEAVATAR_LANE_POOL
          value: {{ $pool.name | quote }}
        - name: LIVEAVATAR_LANE_SHAPE
          value: {{ $v.shape | toString | quote }}
        - name: LIVEAVATAR_DEVICE
          value: {{ ternary "cuda" "cpu" $gpu.enabled | quote }}
        - name: LIVEAVATAR_DIST_MASTER_ADDR
          value: "$(LWS_LEADER_ADDRESS)"
        - name: LIVEAVATAR_DIST_MASTER_PORT
          value: {{ $v.distPort | quote }}
        - name: LIVEAVATAR_DIST_RANK
          value: "$(LWS_WORKER_INDEX)"
        - name: LIVEAVATAR_DIST_WORLD_SIZE
          value: "$(LWS_GROUP_SIZE)"
        # the lane id is <leaderworkerset>-<group index>; its audio-features partition is base + group index
        - name: LIVEAVATAR_LANE_GROUP_INDEX
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['leaderworkerset.sigs.k8s.io/group-index']
        - name: LIVEAVATAR_LANE_ID_PREFIX
          value: {{ .name | quote }}
        - name: LIVEAVATAR_LANE_PARTITION_BASE
          value: {{ .partitionBase | quote }}
        - name: LIVEAVATAR_HEALTH_PORT_BY_RANK
          value: "false"
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- include "liveavatar.probes" (dict "values" $v "port" "http") | nindent 6 }}
      {{- $res := deepCopy (default $v.resources $pool.resources) }}
      {{- if $gpu.enabled }}
      {{- $one := dict $gpu.resourceName 1 }}
      {{- $_ := set $res "requests" (merge (deepCopy $one) (default (dict) $res.requests)) }}
      {{- $_ := set $res "limits" (merge (deepCopy $one) (default (dict) $res.limits)) }}
      {{- end }}
      resources:
        {{- toYaml $res | nindent 8 }}
      volumeMounts:
        {{- include "liveavatar.volumeMounts" (dict "ctx" $ctx "models" true) | nindent 8 }}
        - name: shm
          mountPath: /dev/shm
  volumes:
    {{- include "liveavatar.volumes" (dict "ctx" $ctx "models" true) | nindent 4 }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.shmSizeLimit }}
{{- end -}}
