{{/* Pod/container security of the Apache Kafka image (its unprivileged user appuser, uid 1000). */}}
{{- define "liveavatar.kafka.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{- define "liveavatar.kafka.containerSecurityContext" -}}
allowPrivilegeEscalation: false
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}
