{{/* Deployment and Service of the gateway or the annotator (same image, same config file). */}}

{{- define "moaa.serverTLS" -}}
{{- and .root.Values.tls.enabled (or (eq .which "gateway") .root.Values.tls.annotator) -}}
{{- end -}}

{{- define "moaa.serverDeployment" -}}
{{- $root := .root -}}
{{- $v := get $root.Values .which -}}
{{- $labels := dict "root" $root "component" .which -}}
{{- $tls := include "moaa.serverTLS" . | eq "true" -}}
{{- $image := $root.Values.images.moaa -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "moaa.componentName" (dict "root" $root "suffix" .which) }}
  labels:
    {{- include "moaa.labels" $labels | nindent 4 }}
spec:
  replicas: {{ int $v.replicas }}
  selector:
    matchLabels:
      {{- include "moaa.selectorLabels" $labels | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "moaa.podLabels" $labels | nindent 8 }}
      annotations:
        # Roll the pods when the config changes: they read it once at start.
        checksum/config: {{ include "moaa.config" $root | sha256sum }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      automountServiceAccountToken: false
      {{- with include "moaa.serviceAccountName" $root }}
      serviceAccountName: {{ . }}
      {{- end }}
      {{- with include "moaa.imagePullSecrets" $root | trim }}{{ . | nindent 6 }}{{- end }}
      {{- with include "moaa.placement" (dict "root" $root "v" $v) | trim }}{{ . | nindent 6 }}{{- end }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        runAsGroup: 10001
        fsGroup: 10001
        seccompProfile:
          type: RuntimeDefault
      {{- /* the preStop sleep, then the server's own shutdown grace, then a margin */}}
      terminationGracePeriodSeconds: {{ add 10 (int (default 30 $v.server.shutdown_grace_s)) }}
      containers:
        - name: {{ .which }}
          image: {{ include "moaa.image" (dict "image" $image "root" $root) | quote }}
          imagePullPolicy: {{ $image.pullPolicy }}
          command: ["moaa", {{ .which | quote }}, "serve", "--config", "{{ include "moaa.configDir" . }}/moaa.yaml"]
          lifecycle:
            # Keep serving while the Service's endpoints drop this pod (they update asynchronously);
            # SIGTERM then starts the server's own graceful shutdown. No call is refused mid-roll.
            preStop:
              exec:
                command: ["sleep", "5"]
          {{- with $v.env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: grpc
              containerPort: {{ int $v.port }}
              protocol: TCP
            {{- if and (eq .which "gateway") (gt (int $v.httpPort) 0) }}
            - name: http
              containerPort: {{ int $v.httpPort }}
              protocol: TCP
            {{- end }}
            - name: metrics
              containerPort: {{ int $v.metricsPort }}
              protocol: TCP
          {{- /* Kubelet's gRPC probe cannot speak TLS: fall back to a TCP check then. (Health is exempt from auth.) */}}
          {{- $probe := dict "grpc" (dict "port" (int $v.port)) }}
          {{- if $tls }}
          {{- $probe = dict "tcpSocket" (dict "port" "grpc") }}
          {{- end }}
          readinessProbe:
            {{- toYaml $probe | nindent 12 }}
            periodSeconds: 10
            timeoutSeconds: 5
          livenessProbe:
            {{- toYaml $probe | nindent 12 }}
            periodSeconds: 20
            timeoutSeconds: 5
            failureThreshold: 3
          {{- with $v.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities:
              drop: ["ALL"]
          volumeMounts:
            - name: config
              mountPath: {{ include "moaa.configDir" . }}
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- if $tls }}
            - name: tls
              mountPath: {{ include "moaa.tlsDir" . }}
              readOnly: true
            {{- end }}
            {{- if $root.Values.auth.enabled }}
            - name: auth
              mountPath: {{ include "moaa.authDir" . }}
              readOnly: true
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "moaa.componentName" (dict "root" $root "suffix" "config") }}
        - name: tmp
          emptyDir: {}
        {{- if $tls }}
        - name: tls
          secret:
            secretName: {{ $root.Values.tls.secretName }}
            defaultMode: 0440  # the key and tokens: owner and fsGroup (the server) only, not every process
            items:
              - {key: tls.crt, path: tls.crt}
              - {key: tls.key, path: tls.key}
              {{- /* the CA: servers check client certificates with it (mutual), the gateway the annotator's */}}
              {{- if or $root.Values.tls.mutual (and (eq .which "gateway") $root.Values.tls.annotator) }}
              - {key: ca.crt, path: ca.crt}
              {{- end }}
        {{- end }}
        {{- if $root.Values.auth.enabled }}
        - name: auth
          secret:
            secretName: {{ include "moaa.authSecretName" $root }}
            defaultMode: 0440
            items:
              - {key: {{ $root.Values.auth.key }}, path: {{ $root.Values.auth.key }}}
        {{- end }}
{{- end -}}

{{- define "moaa.serverService" -}}
{{- $v := get .root.Values .which -}}
{{- $labels := dict "root" .root "component" .which -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "moaa.componentName" (dict "root" .root "suffix" .which) }}
  labels:
    {{- include "moaa.labels" $labels | nindent 4 }}
  {{- with $v.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $v.service.type }}
  selector:
    {{- include "moaa.selectorLabels" $labels | nindent 4 }}
  ports:
    - name: grpc
      port: {{ int $v.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if and (eq .which "gateway") (gt (int $v.httpPort) 0) }}
    - name: http
      port: {{ int $v.httpPort }}
      targetPort: http
      protocol: TCP
      appProtocol: {{ ternary "https" "http" .root.Values.tls.enabled }}
    {{- end }}
    - name: metrics
      port: {{ int $v.metricsPort }}
      targetPort: metrics
      protocol: TCP
{{- if $v.service.headless }}
---
# Every ready pod's address under one DNS name, for gRPC clients that balance over the pods themselves
# (dns:///NAME:PORT with round_robin, as moaa's clients do); no metrics port, so a ServiceMonitor
# selecting these labels scrapes each pod once, through the Service above.
apiVersion: v1
kind: Service
metadata:
  name: {{ include "moaa.componentName" (dict "root" .root "suffix" (printf "%s-headless" .which)) }}
  labels:
    {{- include "moaa.labels" $labels | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- include "moaa.selectorLabels" $labels | nindent 4 }}
  ports:
    - name: grpc
      port: {{ int $v.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
{{- end }}
{{- end -}}
