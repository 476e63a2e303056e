{{/* Names, labels, the model merge and the gateway config, shared by the templates. */}}

{{- define "moaa.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moaa.fullname" -}}
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

{{- define "moaa.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select one component's pods. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "moaa.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moaa.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of a component's pods: the selector's, then "extra" (a dict, optional), then commonLabels, the
first winning a clash (no version: a chart upgrade alone must not restart pods). Call like moaa.selectorLabels. */}}
{{- define "moaa.podLabels" -}}
{{- $l := merge (include "moaa.selectorLabels" . | fromYaml) (deepCopy (default (dict) .extra)) (deepCopy .root.Values.commonLabels) -}}
{{- toYaml $l -}}
{{- end -}}

{{- define "moaa.labels" -}}
{{ include "moaa.selectorLabels" . }}
helm.sh/chart: {{ include "moaa.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: moaa
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
"<fullname>-<suffix>" within 63 characters (a Service name is a DNS label): a fullname too long for the
suffix is cut, and 5 characters of its hash keep two cut names apart. (dict "root" $ "suffix" "gateway")
*/}}
{{- define "moaa.componentName" -}}
{{- $full := include "moaa.fullname" .root -}}
{{- $name := printf "%s-%s" $full .suffix -}}
{{- if gt (len $name) 63 -}}
{{- $name = printf "%s-%s-%s" ($full | trunc (int (sub 56 (len .suffix))) | trimSuffix "-") (sha256sum $full | trunc 5) .suffix -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/* Service (and Deployment) name of a model. */}}
{{- define "moaa.modelName" -}}
{{- include "moaa.componentName" (dict "root" .root "suffix" .name) -}}
{{- end -}}

{{/* image reference: (dict "image" .Values.images.moaa "root" $) */}}
{{- define "moaa.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/*
Deep merge of two maps as JSON: maps merge key by key, anything else in "over" replaces "base".
Written out because sprig's merge treats 0, false and "" as unset (a model could not set replicas: 0).
*/}}
{{- define "moaa.merge" -}}
{{- $out := deepCopy .base -}}
{{- range $k, $v := .over -}}
{{- $cur := get $out $k -}}
{{- if and (kindIs "map" $v) (kindIs "map" $cur) -}}
{{- $_ := set $out $k (include "moaa.merge" (dict "base" $cur "over" $v) | fromJson) -}}
{{- else -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* A model entry merged over modelDefaults, as JSON. Call with (dict "root" $ "model" .). */}}
{{- define "moaa.model" -}}
{{- $m := include "moaa.merge" (dict "base" .root.Values.modelDefaults "over" .model) | fromJson -}}
{{- $gpus := int $m.gpus -}}
{{- $tp := int $m.vllm.tensorParallelSize -}}
{{- if eq $tp 0 -}}{{- $tp = max $gpus 1 | int -}}{{- end -}}
{{- if and (gt $gpus 0) (gt $tp $gpus) -}}
{{- fail (printf "models[%s]: vllm.tensorParallelSize=%d needs at least %d GPUs, but gpus=%d" $m.name $tp $tp $gpus) -}}
{{- end -}}
{{- $_ := set $m.vllm "tensorParallelSize" $tp -}}
{{- $_ := set $m "servedModelName" (default $m.name $m.servedModelName) -}}
{{- toJson $m -}}
{{- end -}}

{{/* Checks that span several values; fails the render with a message naming the value to change. */}}
{{- define "moaa.validate" -}}
{{- $seen := dict -}}
{{- range .Values.models -}}
{{- if hasKey $seen .name -}}
{{- fail (printf "models: the name %q is used twice; model names must be unique" .name) -}}
{{- end -}}
{{- $_ := set $seen .name true -}}
{{- if has .name (list "gateway" "annotator" "gateway-headless" "annotator-headless") -}}
{{- fail (printf "models: the name %q would make a second Deployment and Service %s; pick another" .name (include "moaa.modelName" (dict "root" $ "name" .name))) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.gateway.enabled .Values.gateway.ingress.enabled (eq (int .Values.gateway.httpPort) 0) -}}
{{- fail "gateway.ingress.enabled needs the HTTP door: gateway.httpPort is 0" -}}
{{- end -}}
{{- if and .Values.annotator.enabled (not .Values.annotator.ensembles) -}}
{{- $judges := list -}}
{{- range .Values.models -}}
{{- $m := include "moaa.model" (dict "root" $ "model" .) | fromJson -}}
{{- if has "judge" $m.roles -}}{{- $judges = append $judges $m.name -}}{{- end -}}
{{- end -}}
{{- if not $judges -}}
{{- fail "annotator.enabled needs a judge ensemble: give a model the judge role, set annotator.ensembles, or set annotator.enabled: false" -}}
{{- end -}}
{{- end -}}
{{- $fullname := include "moaa.fullname" . -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $fullname) -}}
{{- fail (printf "the object names would start with %q, which Services refuse (DNS-1035: a lower-case letter first, no dots): choose another release name or set fullnameOverride" $fullname) -}}
{{- end -}}
{{- range $which := list "gateway" "annotator" -}}
{{- $v := get $.Values $which -}}
{{- $ports := list (int $v.port) (int $v.metricsPort) -}}
{{- if eq $which "gateway" -}}{{- if gt (int $v.httpPort) 0 -}}{{- $ports = append $ports (int $v.httpPort) -}}{{- end -}}{{- end -}}
{{- if ne (len $ports) (len (uniq $ports)) -}}
{{- fail (printf "%s: port, metricsPort%s must differ (one Service port each; got %s)" $which (ternary " and httpPort" "" (eq $which "gateway")) (join ", " $ports)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.gateway.enabled (not .Values.gateway.recipes) (not (include "moaa.config" . | fromYaml).recipes) -}}
{{- fail "gateway.enabled needs a recipe: give a model the aggregator role, set gateway.recipes, or set gateway.enabled: false" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled is true but tls.secretName is empty: name a kubernetes.io/tls Secret" -}}
{{- end -}}
{{- range $name, $_ := .Values.gateway.extraBackends -}}
{{- if hasKey $seen $name -}}
{{- fail (printf "gateway.extraBackends.%s: a model of the chart already has this name" $name) -}}
{{- end -}}
{{- end -}}
{{- include "moaa.validateReferences" (include "moaa.config" . | fromYaml) -}}
{{- end -}}

{{/*
The reference rule of the config loader (MoaaConfig._references_exist), on the config the pods will load:
without it a typo renders fine and every gateway pod crash-loops on the loader's error.
*/}}
{{- define "moaa.validateReferences" -}}
{{- $known := keys .backends | sortAlpha -}}
{{- $backends := join ", " $known -}}
{{- range $r, $recipe := .recipes -}}
{{- range append (default (list) $recipe.proposers) (default (dict) $recipe.aggregator) -}}
{{- if not (has .model $known) -}}
{{- fail (printf "gateway.recipes.%s uses model %q, which no backend declares (backends: %s)" $r (toString .model) $backends) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $r, $recipe := .recipes -}}
{{- /* RecipeConfig._consistent */ -}}
{{- $n := len (default (list) $recipe.proposers) -}}
{{- $min := int (default 1 $recipe.min_proposers) -}}
{{- if gt $min $n -}}
{{- fail (printf "gateway.recipes.%s: min_proposers=%d exceeds the %d proposers" $r $min $n) -}}
{{- end -}}
{{- if $recipe.first_k -}}
{{- if gt (int $recipe.first_k) $n -}}
{{- fail (printf "gateway.recipes.%s: first_k=%d exceeds the %d proposers" $r (int $recipe.first_k) $n) -}}
{{- end -}}
{{- if lt (int $recipe.first_k) $min -}}
{{- fail (printf "gateway.recipes.%s: first_k=%d is below min_proposers=%d" $r (int $recipe.first_k) $min) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $e, $ens := .ensembles -}}
{{- $judges := default (list) $ens.judges -}}
{{- /* EnsembleConfig._unique_names */ -}}
{{- $names := dict -}}
{{- range $judges -}}
{{- if hasKey $names (toString .name) -}}
{{- fail (printf "annotator.ensembles.%s: judge names must be unique; repeated: %s" $e (toString .name)) -}}
{{- end -}}
{{- $_ := set $names (toString .name) true -}}
{{- end -}}
{{- with $ens.aggregator -}}
{{- if hasKey $names (toString .name) -}}
{{- fail (printf "annotator.ensembles.%s: the aggregator judge's name %q is also a judge's; give it its own" $e (toString .name)) -}}
{{- end -}}
{{- end -}}
{{- if and $ens.min_judges (gt (int $ens.min_judges) (len $judges)) -}}
{{- fail (printf "annotator.ensembles.%s: min_judges=%d exceeds the %d judges" $e (int $ens.min_judges) (len $judges)) -}}
{{- end -}}
{{- if le (float64 (ternary $ens.scale_max 10 (hasKey $ens "scale_max"))) (float64 (ternary $ens.scale_min 1 (hasKey $ens "scale_min"))) -}}
{{- fail (printf "annotator.ensembles.%s: scale_max must be larger than scale_min" $e) -}}
{{- end -}}
{{- with $ens.aggregator -}}{{- $judges = append $judges . -}}{{- end -}}
{{- range $judges -}}
{{- if not (has .model $known) -}}
{{- fail (printf "annotator.ensembles.%s judge %q uses model %q, which no backend declares (backends: %s)" $e (toString .name) (toString .model) $backends) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .default_recipe (not (hasKey (default (dict) .recipes) .default_recipe)) -}}
{{- fail (printf "gateway.defaultRecipe %q is not a recipe (recipes: %s)" .default_recipe (keys (default (dict) .recipes) | sortAlpha | join ", ")) -}}
{{- end -}}
{{- if and .default_ensemble (not (hasKey (default (dict) .ensembles) .default_ensemble)) -}}
{{- fail (printf "annotator.defaultEnsemble %q is not an ensemble (ensembles: %s)" .default_ensemble (keys (default (dict) .ensembles) | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}

{{/* HOME of a non-root vLLM pod (modelDefaults.nonRoot), an emptyDir. */}}
{{- define "moaa.vllmHome" -}}/home/vllm{{- end -}}

{{/* Where the config file, TLS files and auth tokens are mounted in gateway and annotator pods. */}}
{{- define "moaa.configDir" -}}/etc/moaa/config{{- end -}}
{{- define "moaa.tlsDir" -}}/etc/moaa/tls{{- end -}}
{{- define "moaa.authDir" -}}/etc/moaa/auth{{- end -}}

{{- define "moaa.authSecretName" -}}
{{- default (include "moaa.componentName" (dict "root" . "suffix" "auth")) .Values.auth.existingSecret -}}
{{- end -}}

{{/*
The generated token: what the existing Secret (a `lookup` result; empty on a first install and under
`helm template`) holds under key, else 40 random letters and digits. Call with (dict "existing" $s "key" $k).
*/}}
{{- define "moaa.keptToken" -}}
{{- $data := (default (dict) .existing).data | default (dict) -}}
{{- $old := get $data .key | b64dec | trim -}}
{{- default (randAlphaNum 40) $old -}}
{{- end -}}

{{/* The server section of the config for "gateway" or "annotator". Call with (dict "root" $ "which" "gateway"). */}}
{{- define "moaa.serverConfig" -}}
{{- $v := get .root.Values .which -}}
{{- $s := dict "host" "0.0.0.0" "port" (int $v.port) "metrics_port" (int $v.metricsPort) -}}
{{- if eq .which "gateway" -}}
{{- $_ := set $s "http_port" (ternary (int $v.httpPort) nil (gt (int $v.httpPort) 0)) -}}
{{- end -}}
{{- $s = include "moaa.merge" (dict "base" $s "over" $v.server) | fromJson -}}
{{- if and .root.Values.tls.enabled (or (eq .which "gateway") .root.Values.tls.annotator) -}}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" (include "moaa.tlsDir" .)) "key_file" (printf "%s/tls.key" (include "moaa.tlsDir" .)) -}}
{{- if .root.Values.tls.mutual -}}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" (include "moaa.tlsDir" .)) -}}
{{- end -}}
{{- $_ := set $s "tls" $tls -}}
{{- end -}}
{{- if .root.Values.auth.enabled -}}
{{- $_ := set $s "auth" (dict "tokens_file" (printf "%s/%s" (include "moaa.authDir" .) .root.Values.auth.key)) -}}
{{- end -}}
{{- toJson $s -}}
{{- end -}}

{{/* The moaa config file (moaa.services.config.MoaaConfig), as YAML. */}}
{{- define "moaa.config" -}}
{{- $root := . -}}
{{- $backends := dict -}}
{{- $proposers := list -}}
{{- $aggregators := list -}}
{{- $judges := list -}}
{{- range .Values.models -}}
{{- $m := include "moaa.model" (dict "root" $root "model" .) | fromJson -}}
{{- $url := printf "http://%s:8000/v1" (include "moaa.modelName" (dict "root" $root "name" $m.name)) -}}
{{- $b := dict "urls" (list $url) "served_model" $m.servedModelName "context_window" (int $m.vllm.maxModelLen) -}}
{{- $_ := set $backends $m.name (include "moaa.merge" (dict "base" $b "over" $m.backend) | fromJson) -}}
{{- if has "proposer" $m.roles -}}{{- $proposers = append $proposers (dict "model" $m.name) -}}{{- end -}}
{{- if has "aggregator" $m.roles -}}{{- $aggregators = append $aggregators (dict "model" $m.name) -}}{{- end -}}
{{- if has "judge" $m.roles -}}{{- $judges = append $judges (dict "name" $m.name "model" $m.name) -}}{{- end -}}
{{- end -}}
{{- range $name, $b := .Values.gateway.extraBackends -}}
{{- $_ := set $backends $name $b -}}
{{- end -}}
{{- $cfg := dict "backends" $backends -}}
{{- if .Values.gateway.recipes -}}
{{- $_ := set $cfg "recipes" .Values.gateway.recipes -}}
{{- else if and $proposers $aggregators -}}
{{- $_ := set $cfg "recipes" (dict "default" (dict "proposers" $proposers "aggregator" (first $aggregators))) -}}
{{- end -}}
{{- with .Values.gateway.defaultRecipe -}}{{- $_ := set $cfg "default_recipe" . -}}{{- end -}}
{{- if .Values.annotator.ensembles -}}
{{- $_ := set $cfg "ensembles" .Values.annotator.ensembles -}}
{{- else if $judges -}}
{{- $_ := set $cfg "ensembles" (dict "default" (dict "judges" $judges "mode" "pointwise" "combine" "mean")) -}}
{{- end -}}
{{- with .Values.annotator.defaultEnsemble -}}{{- $_ := set $cfg "default_ensemble" . -}}{{- end -}}
{{- $_ := set $cfg "gateway" (include "moaa.serverConfig" (dict "root" $root "which" "gateway") | fromJson) -}}
{{- $_ := set $cfg "annotator" (include "moaa.serverConfig" (dict "root" $root "which" "annotator") | fromJson) -}}
{{- if .Values.annotator.enabled -}}
{{- $annotatorName := include "moaa.componentName" (dict "root" $root "suffix" "annotator") -}}
{{- if .Values.annotator.service.headless -}}
{{- /* every annotator pod's address: the gateway's round_robin channel spreads its calls over them */ -}}
{{- $_ := set $cfg "annotator_address" (printf "dns:///%s:%d" (include "moaa.componentName" (dict "root" $root "suffix" "annotator-headless")) (int .Values.annotator.port)) -}}
{{- else -}}
{{- $_ := set $cfg "annotator_address" (printf "%s:%d" $annotatorName (int .Values.annotator.port)) -}}
{{- end -}}
{{- if and .Values.tls.enabled .Values.tls.annotator -}}
{{- /* the gateway trusts the Secret's ca.crt; with mutual TLS it shows the Secret's certificate as its own;
       the certificate is checked against the annotator Service's name, whichever target is dialled */ -}}
{{- $ctls := dict "ca_file" (printf "%s/ca.crt" (include "moaa.tlsDir" $root)) "server_name" $annotatorName -}}
{{- if .Values.tls.mutual -}}
{{- $_ := set $ctls "cert_file" (printf "%s/tls.crt" (include "moaa.tlsDir" $root)) -}}
{{- $_ := set $ctls "key_file" (printf "%s/tls.key" (include "moaa.tlsDir" $root)) -}}
{{- end -}}
{{- $_ := set $cfg "annotator_tls" $ctls -}}
{{- end -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Pod placement: the component's own settings, else the global ones. (dict "root" $ "v" .Values.gateway) */}}
{{- define "moaa.placement" -}}
{{- with (default .root.Values.nodeSelector .v.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.tolerations .v.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.affinity .v.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The pods' service account: made by the chart, named, or empty (the namespace's default). */}}
{{- define "moaa.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moaa.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "moaa.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
