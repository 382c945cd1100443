{{- define "streamscore.name" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "streamscore.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "streamscore.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The workers' replicas can never exceed the request topics' partitions (a consumer group's bound). */}}
{{- define "streamscore.maxReplicas" -}}
{{- min (int .Values.autoscaling.maxReplicas) (int .Values.partitions) -}}
{{- end -}}

{{- define "streamscore.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* Settings: the chart's own, then `config`, then one *_FILE (or cert path) per mounted secret key. */}}
{{- define "streamscore.env" -}}
- name: STREAMSCORE_TOPIC_PREFIX
  value: {{ .Values.topicPrefix | quote }}
- name: STREAMSCORE_WORKER__PARTITIONS
  value: {{ .Values.partitions | quote }}
- name: STREAMSCORE_WORKER__WEB_PORT
  value: {{ .Values.worker.webPort | quote }}
{{- range $name, $value := .Values.config }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- range .Values.secretFiles }}
- name: {{ .setting }}
  value: {{ printf "/var/run/secrets/streamscore/%s/%s" .secretName .key | quote }}
{{- end }}
{{- end -}}

{{- define "streamscore.volumes" -}}
- name: data
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: views
  configMap:
    name: {{ include "streamscore.name" . }}-views
- name: models
  {{- toYaml .Values.modelLibrary | nindent 2 }}
{{- range .Values.secretFiles }}
- name: {{ printf "secret-%s-%s" .secretName .key | replace "." "-" | replace "_" "-" | lower | trunc 63 | trimSuffix "-" }}
  secret:
    secretName: {{ .secretName }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end -}}

{{- define "streamscore.volumeMounts" -}}
- name: data
  mountPath: /data
- name: tmp
  mountPath: /tmp
- name: views
  mountPath: /config
  readOnly: true
- name: models
  mountPath: /models
  readOnly: true
{{- range .Values.secretFiles }}
- name: {{ printf "secret-%s-%s" .secretName .key | replace "." "-" | replace "_" "-" | lower | trunc 63 | trimSuffix "-" }}
  mountPath: {{ printf "/var/run/secrets/streamscore/%s" .secretName }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "streamscore.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "streamscore.containerSecurityContext" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}
