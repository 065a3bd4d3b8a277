{{/*
Workload helpers shared by the CPU services (session-api, audio-encoder, stream-packager, webhooks, lane-controller).
Each component's folder holds one small template per kind that calls these.
*/}}

{{/*
Deployment of one LiveAvatar service.
Args: ctx, component (hyphenated name), values (component values), port (container port),
      models (mount /models), serviceAccount (name or ""), extraEnv (list of EnvVar dicts, optional).
*/}}
{{- define "liveavatar.deployment" -}}
{{- $ctx := .ctx -}}
{{- $v := .values -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "liveavatar.componentName" (dict "ctx" $ctx "component" .component) }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "liveavatar.labels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
  {{- include "liveavatar.commonAnnotations" (dict "ctx" $ctx) }}
spec:
  {{- if not (and $v.autoscaling $v.autoscaling.enabled) }}
  replicas: {{ $v.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "liveavatar.selectorLabels" (dict "ctx" $ctx "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "liveavatar.labels" (dict "ctx" $ctx "component" .component) | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "liveavatar.podAnnotations" (dict "ctx" $ctx "values" $v) | nindent 8 }}
    spec:
      {{- include "liveavatar.podSpecCommon" (dict "ctx" $ctx "values" $v) | nindent 6 }}
      {{- if .serviceAccount }}
      serviceAccountName: {{ .serviceAccount }}
      automountServiceAccountToken: true
      {{- else }}
      automountServiceAccountToken: false
      {{- end }}
      {{- if hasKey $v "terminationGracePeriodSeconds" }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "liveavatar.image" (dict "ctx" $ctx "image" $v.image) | quote }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          securityContext:
            {{- toYaml $ctx.Values.containerSecurityContext | nindent 12 }}
          ports:
            - name: http
              containerPort: {{ .port }}
              protocol: TCP
          envFrom:
            {{- include "liveavatar.envFrom" (dict "ctx" $ctx) | nindent 12 }}
          env:
            {{- include "liveavatar.env" (dict "ctx" $ctx) | nindent 12 }}
            {{- with .extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "liveavatar.probes" (dict "values" $v "port" "http") | nindent 10 }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          volumeMounts:
            {{- include "liveavatar.volumeMounts" (dict "ctx" $ctx "models" .models) | nindent 12 }}
      volumes:
        {{- include "liveavatar.volumes" (dict "ctx" $ctx "models" .models) | nindent 8 }}
{{- end -}}

{{/* ClusterIP Service of one component. Args: ctx, component, port (service port), targetPort, type, annotations. */}}
{{- define "liveavatar.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "liveavatar.componentName" (dict "ctx" .ctx "component" .component) }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "liveavatar.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
  {{- $ann := merge (dict) (default (dict) .annotations) (default (dict) .ctx.Values.commonAnnotations) }}
  {{- with $ann }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ default "ClusterIP" .type }}
  selector:
    {{- include "liveavatar.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
  ports:
    - name: http
      port: {{ .port }}
      targetPort: http
      protocol: TCP
{{- end -}}

{{/* HorizontalPodAutoscaler (autoscaling/v2) on CPU. Args: ctx, component, values. */}}
{{- define "liveavatar.hpa" -}}
{{- if .values.autoscaling.enabled }}
{{- if gt (int .values.autoscaling.minReplicas) (int .values.autoscaling.maxReplicas) }}
{{- fail (printf "%s autoscaling: minReplicas (%d) must be <= maxReplicas (%d)" .component (int .values.autoscaling.minReplicas) (int .values.autoscaling.maxReplicas)) }}
{{- end }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "liveavatar.componentName" (dict "ctx" .ctx "component" .component) }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "liveavatar.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
  {{- include "liveavatar.commonAnnotations" (dict "ctx" .ctx) }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "liveavatar.componentName" (dict "ctx" .ctx "component" .component) }}
  minReplicas: {{ .values.autoscaling.minReplicas }}
  maxReplicas: {{ .values.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .values.autoscaling.targetCPUUtilizationPercentage }}
{{- end }}
{{- end -}}

{{/* PodDisruptionBudget. Args: ctx, component, pdb (values with enabled/maxUnavailable), name (optional), selector (optional dict). */}}
{{- define "liveavatar.pdb" -}}
{{- if .pdb.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ default (include "liveavatar.componentName" (dict "ctx" .ctx "component" .component)) .name }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "liveavatar.labels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
  {{- include "liveavatar.commonAnnotations" (dict "ctx" .ctx) }}
spec:
  maxUnavailable: {{ .pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "liveavatar.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 6 }}
      {{- with .selector }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
{{- end }}
{{- end -}}
