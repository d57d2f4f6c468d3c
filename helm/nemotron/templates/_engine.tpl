{{/*
The containers that fetch a checkpoint and build its engine, shared by the build Job and by the
server pods' init containers (engine.build.mode=initContainer).
*/}}

{{/* nemotron.downloadContainer: fetches the Hugging Face checkpoint into the model volume (skips files already there). */}}
{{- define "nemotron.downloadContainer" -}}
- name: download-model
  image: {{ include "nemotron.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  # huggingface_hub's snapshot_download (a dependency of the image, through tokenizers): its
  # Python API has kept these arguments across versions, where its CLIs' flags have not.
  command:
    - python3
    - -c
    - |
      import sys
      from huggingface_hub import snapshot_download
      repository, revision, directory, *patterns = sys.argv[1:]
      snapshot_download(repository, revision=revision, local_dir=directory, allow_patterns=patterns)
      print(f"{repository}@{revision} is in {directory}")
    - {{ .Values.model.download.repository }}
    - {{ .Values.model.download.revision | quote }}
    - {{ include "nemotron.checkpointPath" . }}
    {{- range .Values.model.download.include }}
    - {{ . | quote }}
    {{- end }}
  env:
    - {name: HOME, value: /tmp}
    - {name: HF_HOME, value: /tmp/huggingface}
    - {name: HF_HUB_DISABLE_TELEMETRY, value: "1"}
    {{- with .Values.model.download.endpoint }}
    - {name: HF_ENDPOINT, value: {{ . | quote }}}
    {{- end }}
    {{- with .Values.model.download.tokenSecret.name }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef: {name: {{ . }}, key: {{ $.Values.model.download.tokenSecret.key }}}
    {{- end }}
  securityContext:
    {{- toYaml .Values.server.securityContext | nindent 4 }}
  resources:
    {{- toYaml .Values.model.download.resources | nindent 4 }}
  volumeMounts:
    - {name: model, mountPath: /models}
    - {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* nemotron.buildContainer: builds the profile's engine with the chart's backend (nemotron.backend) into the cache key's repository; the repository's lock serializes builders and a built engine is skipped. */}}
{{- define "nemotron.buildContainer" -}}
- name: build-engine
  image: {{ include "nemotron.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - nemotron-build
    - build
    - --profile
    - {{ .Values.profile }}
    - --precision
    - {{ include "nemotron.precision" . }}
    # The backend the server runs: engine.backend, else the profile's default (nemotron.backend).
    - --backend
    - {{ include "nemotron.backend" . }}
    {{- if hasPrefix "tensorrt-llm" (include "nemotron.backend" .) }}
    {{- with .Values.engine.build.calibrationDataset }}
    - --calibration-dataset
    - {{ . | quote }}
    {{- end }}
    {{- end }}
    - --checkpoint
    - {{ include "nemotron.checkpointPath" . }}
    - --repo
    - {{ include "nemotron.engineRepo" . }}
  env:
    - {name: HOME, value: /tmp}
  securityContext:
    {{- toYaml .Values.server.securityContext | nindent 4 }}
  resources:
    {{- include "nemotron.buildResources" . | nindent 4 }}
  volumeMounts:
    - {name: model, mountPath: /models, readOnly: {{ eq (include "nemotron.modelSource" .) "pvc" }}}
    - {name: engines, mountPath: /var/lib/nemotron/engines}
    - {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* nemotron.buildPodSpec: the build Job's pod spec (its hash names the Job). */}}
{{- define "nemotron.buildPodSpec" -}}
restartPolicy: Never
serviceAccountName: {{ include "nemotron.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  {{- toYaml .Values.server.podSecurityContext | nindent 2 }}
{{- with .Values.engine.build.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- /* TensorRT-LLM engines are compiled for the GPU that builds them; ModelOpt's FP8 calibration runs the model: both build on the profile's GPUs. */}}
{{- $onGpus := eq (include "nemotron.buildsOnGpus" .) "true" -}}
{{- if .Values.engine.build.affinity }}
affinity:
  {{- toYaml .Values.engine.build.affinity | nindent 2 }}
{{- else if $onGpus }}
affinity:
  {{- include "nemotron.gpuAffinity" . | nindent 2 }}
{{- end }}
{{- if or $onGpus .Values.engine.build.tolerations }}
tolerations:
  {{- if $onGpus }}
  - key: nvidia.com/gpu
    operator: Exists
    effect: NoSchedule
  {{- end }}
  {{- with .Values.engine.build.tolerations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- if eq (include "nemotron.modelSource" .) "download" }}
initContainers:
  {{- include "nemotron.downloadContainer" . | nindent 2 }}
{{- end }}
containers:
  {{- include "nemotron.buildContainer" . | nindent 2 }}
volumes:
  - name: model
    persistentVolumeClaim:
      claimName: {{ include "nemotron.modelClaimName" . }}
      readOnly: {{ eq (include "nemotron.modelSource" .) "pvc" }}
  - name: engines
    persistentVolumeClaim:
      claimName: {{ include "nemotron.engineClaimName" . }}
  - name: tmp
    emptyDir:
      sizeLimit: {{ .Values.server.tmpSizeLimit }}
{{- end -}}
