{{/*
Helpers of the nemotron chart. Everything a profile implies is derived here, once.
*/}}

{{/* nemotron.name: the chart name, or nameOverride. */}}
{{- define "nemotron.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* nemotron.fullname: the base of resource names, <release>-<name> unless the release already says it. */}}
{{- define "nemotron.fullname" -}}
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

{{/* nemotron.chart: chart name and version, for the helm.sh/chart label. */}}
{{- define "nemotron.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* nemotron.selectorLabels: the labels that select the server pods (never change them on upgrade). */}}
{{- define "nemotron.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nemotron.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* nemotron.labels: the standard app.kubernetes.io labels of every object, plus commonLabels. */}}
{{- define "nemotron.labels" -}}
helm.sh/chart: {{ include "nemotron.chart" . }}
{{ include "nemotron.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nemotron-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* nemotron.serviceAccountName: the ServiceAccount the pods run as. */}}
{{- define "nemotron.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "nemotron.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* nemotron.profile: the selected entry of the profiles table, as YAML (use with fromYaml). */}}
{{- define "nemotron.profile" -}}
{{- $profile := index .Values.profiles .Values.profile -}}
{{- if not $profile -}}
{{- fail (printf "profile %q has no entry in profiles; known: %s" .Values.profile (keys .Values.profiles | sortAlpha | join ", ")) -}}
{{- end -}}
{{- toYaml $profile -}}
{{- end -}}

{{/*
nemotron.imageProfiles: what the image's engine_build/profiles.yaml builds and serves for each
profile (tests/deploy keep this in step with that file). The builder and the server read the
image's file, not values.yaml: an override of these fields would change the pod but not the
engine, so it is refused (nemotron.validateProfile).
*/}}
{{- define "nemotron.imageProfiles" -}}
a100x4: {tensorParallel: 4, precisions: [bf16], target: sm80}
a100x8: {tensorParallel: 8, precisions: [bf16], target: sm80}
h100x2: {tensorParallel: 2, precisions: [fp8, bf16], target: sm90}
cpu: {tensorParallel: 1, precisions: [bf16, fp32, fp8, int8, int4], target: cpu}
{{- end -}}

{{/* nemotron.validateProfile: refuse overrides of the selected profile the image cannot honour. */}}
{{- define "nemotron.validateProfile" -}}
{{- $name := .Values.profile -}}
{{- $image := index (include "nemotron.imageProfiles" . | fromYaml) $name -}}
{{- $profile := include "nemotron.profile" . | fromYaml -}}
{{- $safe := "of a profile, only gpu.products, shmSize, resources and startupBudgetSeconds may be changed (tensorParallel, precisions, gpu and gpu.architecture follow the image; another tensor-parallel size is another profile, e.g. a100x8)" -}}
{{- if $image -}}
{{- if ne (int $profile.tensorParallel) (int $image.tensorParallel) -}}
{{- fail (printf "profiles.%s.tensorParallel %v: the image's %s profile builds and serves tensor parallel %v, and the engine build and the server read the image's profile, not this value; %s" $name $profile.tensorParallel $name $image.tensorParallel $safe) -}}
{{- end -}}
{{- $target := ternary (dig "gpu" "architecture" "" $profile) "cpu" (hasKey $profile "gpu") -}}
{{- if ne $target $image.target -}}
{{- fail (printf "profiles.%s.gpu: the image's %s profile builds engines for %s, and this entry says %s (the engine's cache key and the node affinity would not match what is built); %s" $name $name $image.target (ternary $target "no GPU" (hasKey $profile "gpu")) $safe) -}}
{{- end -}}
{{- range $profile.precisions -}}
{{- if not (has . $image.precisions) -}}
{{- fail (printf "profiles.%s.precisions: %s is not a precision of the image's %s profile (%s), so no engine of it can be built or served; list a subset of those. %s" $name . $name (join ", " $image.precisions) $safe) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* nemotron.isGpu: "true" when the selected profile uses GPUs (it has a gpu entry). */}}
{{- define "nemotron.isGpu" -}}
{{- $profile := include "nemotron.profile" . | fromYaml -}}
{{- if $profile.gpu -}}true{{- end -}}
{{- end -}}

{{/* nemotron.precision: the engine's weights precision (engine.precision, else the profile's first). */}}
{{- define "nemotron.precision" -}}
{{- $profile := include "nemotron.profile" . | fromYaml -}}
{{- $precision := .Values.engine.precision | default (first $profile.precisions) -}}
{{- if not (has $precision $profile.precisions) -}}
{{- fail (printf "engine.precision %q is not allowed by profile %s; allowed: %s" $precision .Values.profile (join ", " $profile.precisions)) -}}
{{- end -}}
{{- $precision -}}
{{- end -}}

{{/* nemotron.target: the device an engine is built for: sm80, sm90, or cpu. */}}
{{- define "nemotron.target" -}}
{{- $profile := include "nemotron.profile" . | fromYaml -}}
{{- if $profile.gpu }}{{ $profile.gpu.architecture }}{{ else }}cpu{{ end -}}
{{- end -}}

{{/* nemotron.modelSource: embedded, pvc or download (auto resolved by the profile). */}}
{{- define "nemotron.modelSource" -}}
{{- if ne .Values.model.source "auto" -}}
{{- .Values.model.source -}}
{{- else if include "nemotron.isGpu" . -}}
download
{{- else -}}
embedded
{{- end -}}
{{- end -}}

{{/* nemotron.modelSlug: the model part of the cache key. */}}
{{- define "nemotron.modelSlug" -}}
{{- if eq (include "nemotron.modelSource" .) "embedded" -}}
smollm2-135m-instruct
{{- else -}}
{{- .Values.model.name -}}
{{- end -}}
{{- end -}}

{{/* nemotron.backend: the engine backend built and served: engine.backend, else the profile's default (tensorrt-llm on GPU profiles, torch on cpu). */}}
{{- define "nemotron.backend" -}}
{{- $isGpu := eq (include "nemotron.isGpu" .) "true" -}}
{{- $allowed := ternary (list "tensorrt-llm" "tensorrt-llm-pytorch" "torch") (list "torch") $isGpu -}}
{{- $backend := .Values.engine.backend | default (first $allowed) -}}
{{- if not (has $backend $allowed) -}}
{{- fail (printf "engine.backend %q is not allowed by profile %s (TensorRT-LLM needs NVIDIA GPUs); allowed: %s, or \"\" for the profile's default (%s)" $backend .Values.profile (join ", " $allowed) (first $allowed)) -}}
{{- end -}}
{{- $backend -}}
{{- end -}}

{{/* nemotron.backendSlug: the backend part of the cache key: torch, or <backend>-<engine.tensorrtLlmVersion> for both TensorRT-LLM flows (their engines are keyed on the release that built them). */}}
{{- define "nemotron.backendSlug" -}}
{{- $backend := include "nemotron.backend" . -}}
{{- if hasPrefix "tensorrt-llm" $backend -}}
{{- printf "%s-%s" $backend .Values.engine.tensorrtLlmVersion -}}
{{- else -}}
{{- $backend -}}
{{- end -}}
{{- end -}}

{{/* nemotron.cacheKey: what one engine in the cache is for: <model>/<backend>/<profile>-<target>-<precision>-tp<N>. */}}
{{- define "nemotron.cacheKey" -}}
{{- $profile := include "nemotron.profile" . | fromYaml -}}
{{- printf "%s/%s/%s-%s-%s-tp%d" (include "nemotron.modelSlug" .) (include "nemotron.backendSlug" .) .Values.profile (include "nemotron.target" .) (include "nemotron.precision" .) (int $profile.tensorParallel) -}}
{{- end -}}

{{/* nemotron.engineRepo: the engine repository directory of this cache key on the engine volume. */}}
{{- define "nemotron.engineRepo" -}}
{{- printf "/var/lib/nemotron/engines/%s" (include "nemotron.cacheKey" .) -}}
{{- end -}}

{{/* nemotron.checkpointPath: where the checkpoint is inside the containers that mount the model volume. */}}
{{- define "nemotron.checkpointPath" -}}
{{- if .Values.model.subPath -}}
{{- printf "/models/%s" (trimPrefix "/" .Values.model.subPath) -}}
{{- else -}}
/models
{{- end -}}
{{- end -}}

{{/* nemotron.image: the image reference (digest wins over tag; the default tag follows the profile). */}}
{{- define "nemotron.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- $variant := ternary "gpu" "cpu" (eq (include "nemotron.isGpu" .) "true") -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $variant)) -}}
{{- end -}}
{{- end -}}

{{/* nemotron.modelClaimName: the PVC holding the checkpoint. */}}
{{- define "nemotron.modelClaimName" -}}
{{- .Values.model.pvc.existingClaim | default (printf "%s-model" (include "nemotron.fullname" .)) -}}
{{- end -}}

{{/* nemotron.engineClaimName: the PVC holding the engine repository (GPU profiles). */}}
{{- define "nemotron.engineClaimName" -}}
{{- .Values.engine.cache.existingClaim | default (printf "%s-engines" (include "nemotron.fullname" .)) -}}
{{- end -}}

{{/* nemotron.tlsServerName: the name probes and the test expect in the server certificate. */}}
{{- define "nemotron.tlsServerName" -}}
{{- .Values.tls.serverName | default (printf "%s.%s.svc" (include "nemotron.fullname" .) .Release.Namespace) -}}
{{- end -}}

{{/* nemotron.probeMode: grpc (kubelet's native gRPC probe, Kubernetes >= 1.24, plaintext) or exec (nemotron-healthcheck). */}}
{{- define "nemotron.probeMode" -}}
{{- if ne .Values.probes.mode "auto" -}}
{{- .Values.probes.mode -}}
{{- else if .Values.tls.enabled -}}
exec
{{- else if semverCompare ">=1.24.0-0" .Capabilities.KubeVersion.Version -}}
grpc
{{- else -}}
exec
{{- end -}}
{{- end -}}

{{/* nemotron.clientTlsArgs: TLS flags of nemotron-healthcheck and nemotron-chat as a YAML list ("" without TLS). */}}
{{- define "nemotron.clientTlsArgs" -}}
{{- if .Values.tls.enabled -}}
{{- $args := list "--tls-ca" "/etc/nemotron/tls/ca.crt" "--tls-server-name" (include "nemotron.tlsServerName" .) -}}
{{- if .Values.tls.mutual -}}
{{- $args = concat $args (list "--tls-cert" "/etc/nemotron/client-tls/tls.crt" "--tls-key" "/etc/nemotron/client-tls/tls.key") -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}
{{- end -}}

{{/* nemotron.probeHandler: the handler of one probe; call with (dict "context" $ "service" "readiness" "timeout" 5). */}}
{{- define "nemotron.probeHandler" -}}
{{- $ := .context -}}
{{- if eq (include "nemotron.probeMode" $) "grpc" -}}
grpc:
  port: {{ $.Values.server.port }}
  service: {{ .service }}
{{- else -}}
exec:
  command:
    - nemotron-healthcheck
    - --address
    - localhost:{{ $.Values.server.port }}
    - --service
    - {{ .service }}
    - --timeout
    - {{ max 1 (sub (int .timeout) 1) | quote }}
    {{- with include "nemotron.clientTlsArgs" $ }}
    {{- . | nindent 4 }}
    {{- end }}
{{- end -}}
{{- end -}}

{{/* nemotron.startupFailureThreshold: startup checks that fit the load budget (probes.startup.budgetSeconds, else the profile's). */}}
{{- define "nemotron.startupFailureThreshold" -}}
{{- $profile := include "nemotron.profile" . | fromYaml -}}
{{- $budget := int (.Values.probes.startup.budgetSeconds | default $profile.startupBudgetSeconds) -}}
{{- $period := int .Values.probes.startup.periodSeconds -}}
{{- div (add $budget (sub $period 1)) $period -}}
{{- end -}}

{{/* nemotron.serverResources: the profile's resources, overridden by server.resources, plus nvidia.com/gpu = tp on GPU profiles. */}}
{{- define "nemotron.serverResources" -}}
{{- $profile := include "nemotron.profile" . | fromYaml -}}
{{- $resources := mergeOverwrite (deepCopy ($profile.resources | default dict)) (deepCopy .Values.server.resources) -}}
{{- if $profile.gpu -}}
{{- $limits := $resources.limits | default dict -}}
{{- /* A string, like the profiles' cpu requests: server-side apply on Kubernetes < 1.21 rejects integer quantities. */}}
{{- $_ := set $limits "nvidia.com/gpu" (int $profile.tensorParallel | toString) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* nemotron.buildsOnGpus: "true" where the build Job needs the profile's GPUs: tensorrt-llm (engines are compiled for the GPU that builds them) and tensorrt-llm-pytorch fp8 (ModelOpt calibration runs the model); a torch build or a tensorrt-llm-pytorch bf16 one (the checkpoint placed as it is) runs on CPUs. */}}
{{- define "nemotron.buildsOnGpus" -}}
{{- $backend := include "nemotron.backend" . -}}
{{- or (eq $backend "tensorrt-llm") (and (eq $backend "tensorrt-llm-pytorch") (eq (include "nemotron.precision" .) "fp8")) -}}
{{- end -}}

{{/* nemotron.buildResources: the builder's resources: engine.build.resources for a CPU build; for one on GPUs (nemotron.buildsOnGpus) the profile's (the server's node class) overridden by engine.build.gpuResources, plus nvidia.com/gpu = tp. */}}
{{- define "nemotron.buildResources" -}}
{{- if eq (include "nemotron.buildsOnGpus" .) "true" -}}
{{- $profile := include "nemotron.profile" . | fromYaml -}}
{{- $resources := mergeOverwrite (deepCopy ($profile.resources | default dict)) (deepCopy .Values.engine.build.gpuResources) -}}
{{- $limits := $resources.limits | default dict -}}
{{- $_ := set $limits "nvidia.com/gpu" (int $profile.tensorParallel | toString) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- toYaml $resources -}}
{{- else -}}
{{- toYaml .Values.engine.build.resources -}}
{{- end -}}
{{- end -}}

{{/* nemotron.gpuAffinity: required node affinity on the GFD product label and GPU count of the profile. */}}
{{- define "nemotron.gpuAffinity" -}}
{{- $profile := include "nemotron.profile" . | fromYaml -}}
nodeAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    nodeSelectorTerms:
      - matchExpressions:
          - key: nvidia.com/gpu.product
            operator: In
            values:
              {{- toYaml $profile.gpu.products | nindent 14 }}
          - key: nvidia.com/gpu.count
            operator: Gt
            values:
              - {{ sub (int $profile.tensorParallel) 1 | quote }}
{{- end -}}

{{/* nemotron.validate: refusals the schema cannot express, each with what to do instead. */}}
{{- define "nemotron.validate" -}}
{{- $profile := include "nemotron.profile" . | fromYaml -}}
{{- $_ := include "nemotron.validateProfile" . -}}
{{- $source := include "nemotron.modelSource" . -}}
{{- $_ := include "nemotron.precision" . -}}
{{- $_ := include "nemotron.backend" . -}}
{{- if and $profile.gpu (eq $source "embedded") -}}
{{- fail (printf "model.source=embedded (SmolLM2) runs only on profile cpu; profile %s needs model.source pvc or download" .Values.profile) -}}
{{- end -}}
{{- if and (not $profile.gpu) (ne $source "embedded") -}}
{{- fail (printf "profile cpu serves the embedded model (model.source auto or embedded), not model.source=%s" $source) -}}
{{- end -}}
{{- if and (eq $source "pvc") (not .Values.model.pvc.existingClaim) -}}
{{- fail "model.source=pvc needs model.pvc.existingClaim: the PVC that holds the checkpoint" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail (printf "autoscaling.minReplicas %d is above autoscaling.maxReplicas %d" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and .Values.tls.enabled (eq .Values.probes.mode "grpc") -}}
{{- fail "probes.mode=grpc cannot check a TLS server (the kubelet's gRPC probes are plaintext); use probes.mode auto or exec" -}}
{{- end -}}
{{- $server := .Values.server -}}
{{- $shutdown := addf (float64 $server.preStopSeconds) (float64 $server.graceSeconds) -}}
{{- if ge $shutdown (float64 $server.terminationGracePeriodSeconds) -}}
{{- fail (printf "server.preStopSeconds %v + server.graceSeconds %v = %v s must be below server.terminationGracePeriodSeconds %v, or the kubelet kills in-flight calls; raise terminationGracePeriodSeconds or lower the others" $server.preStopSeconds $server.graceSeconds $shutdown $server.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- $ports := dict "server.port" (int $server.port) "server.metricsPort" (int $server.metricsPort) -}}
{{- if $server.httpPort -}}
{{- $_ := set $ports "server.httpPort" (int $server.httpPort) -}}
{{- end -}}
{{- range $name, $number := $ports -}}
{{- range $other, $otherNumber := $ports -}}
{{- if and (lt $name $other) (eq $number $otherNumber) -}}
{{- fail (printf "%s and %s are both %d; the gRPC, HTTP and metrics ports must differ" $name $other $number) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled -}}
{{- fail "autoscaling.enabled and keda.enabled both scale the Deployment (KEDA creates its own HPA); enable one of them" -}}
{{- end -}}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) -}}
{{- fail (printf "keda.minReplicas %d is above keda.maxReplicas %d" (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) -}}
{{- end -}}
{{- if and .Values.inferencePool.enabled (not $server.httpPort) -}}
{{- fail "inferencePool.enabled needs the HTTP API: gateways route to the pool's pods on server.httpPort, which is 0 (off)" -}}
{{- end -}}
{{- end -}}

{{/* nemotron.httpScheme: https when the HTTP API serves the gRPC certificate (tls.enabled), else http. */}}
{{- define "nemotron.httpScheme" -}}
{{- ternary "https" "http" (.Values.tls.enabled | default false) -}}
{{- end -}}

{{/* nemotron.endpointPickerName: the Service of the InferencePool's endpoint picker. */}}
{{- define "nemotron.endpointPickerName" -}}
{{- .Values.inferencePool.endpointPicker.serviceName | default (printf "%s-epp" (include "nemotron.fullname" .) | trunc 63 | trimSuffix "-") -}}
{{- end -}}

{{/* nemotron.kedaQuery: the PromQL of the release's waiting requests (keda.query, else the sum over the chart's ServiceMonitor series). */}}
{{- define "nemotron.kedaQuery" -}}
{{- .Values.keda.query | default (printf "sum(vllm:num_requests_waiting{namespace=%q,service=%q})" .Release.Namespace (include "nemotron.fullname" .)) -}}
{{- end -}}

{{/* nemotron.nodeReaderName: the ClusterRole (and binding) name; cluster-scoped, so it carries the namespace. */}}
{{- define "nemotron.nodeReaderName" -}}
{{- printf "%s-%s-node-reader" .Release.Namespace (include "nemotron.fullname" .) -}}
{{- end -}}

{{/* nemotron.testVolumeMounts: the test pod's writable /tmp and, with TLS, the CA and client certificate. */}}
{{- define "nemotron.testVolumeMounts" -}}
- {name: tmp, mountPath: /tmp}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: /etc/nemotron/tls, readOnly: true}
{{- if .Values.tls.mutual }}
- {name: client-tls, mountPath: /etc/nemotron/client-tls, readOnly: true}
{{- end }}
{{- end }}
{{- end -}}
