# Sourced by scripts/demo: the device flow, from the factory to the field.
# From the caller: $root $work $tcti, functions step and show, and $server_pid.

step "Start the reference EST server (manufacturer, operator and TLS CAs) on loopback"
show tpmid est-server init --dir "$work/est" --secret-out "$work/idevid.secret" >/dev/null
echo "(the IDevID enrollment secret is in $work/idevid.secret, mode 0600; it is never printed)"
tpmid est-server run --dir "$work/est" --port 0 >"$work/est.out" 2>"$work/est.log" &
server_pid=$!
for _ in $(seq 200); do grep -q '^listening on ' "$work/est.out" 2>/dev/null && break; sleep 0.05; done
grep -q '^listening on ' "$work/est.out" || { cat "$work/est.log"; exit 1; }
base=$(sed -n 's|^listening on \(https://[^/]*\)/$|\1|p' "$work/est.out")
echo "EST server at $base/.well-known/est/{idevid,ldevid,edgeca}"

cat > "$work/config.yaml" <<YAML
tpm: {tcti: "$tcti"}
store: {dir: $work/store}
trust: {est_anchors: [$work/est/tls-ca.pem]}
identities:
  idevid:                                   # birth certificate: TCG H-2 key, persistent
    key: {kind: persistent, handle: 0x81020000, template: H-2}
    subject: {cn: IDevID, serial_number: DEMO-0001}
    san: {hardware_module_name: true}
    est:
      url: $base/.well-known/est/idevid
      auth: {headers: {Secret-Value: {file: $work/idevid.secret}}}
      issuer_anchors: [$work/est/manufacturer-ca.pem]
  ldevid:                                   # driver's licence: TPM key file, mTLS with the IDevID
    key: {kind: file, alg: ecc-p256}
    subject: {cn: my-device-id, serial_number: DEMO-0001}   # the server binds it to the IDevID's
    est: {url: $base/.well-known/est/ldevid, auth: {client: idevid}}
    renew: {threshold: 80%, retry: 4%}
  edge-ca:                                  # Edge CA certificate, requested with the LDevID
    key: {kind: file, alg: ecc-p256}
    subject: {cn: my-device-id Edge CA, serial_number: DEMO-0001}
    profile: ca
    est: {url: $base/.well-known/est/edgeca, auth: {client: ldevid}}
    renew: {threshold: 80%, retry: 4%}
YAML
chmod 600 "$work/config.yaml"
export TPMID_CONFIG="$work/config.yaml"
echo "config: $TPMID_CONFIG"

step "Factory: what TPM is this?"
show tpmid tpm info
show tpmid tpm ek

step "Factory: provision the IDevID (key created in the TPM, certified over EST, recorded)"
show tpmid provision --station demo-line-1 --manifest "$work/manifest.jsonl"
show tpm2_readpublic -T "$tcti" -c 0x81020000 -f pem -o "$work/idevid.pub" | grep -A1 attributes
echo "manifest record:"; cat "$work/manifest.jsonl"
step "Factory: running it again is a no-op"
show tpmid provision --station demo-line-1 --manifest "$work/manifest.jsonl"

step "Field: LDevID over mutual TLS, signed by the IDevID inside the TPM"
show tpmid enroll ldevid
show openssl verify -CAfile "$work/est/operator-ca.pem" "$work/store/certs/ldevid/current/cert.pem"
step "Field: the Edge CA certificate, requested with the LDevID"
show tpmid enroll edge-ca
show openssl x509 -in "$work/store/certs/edge-ca/current/cert.pem" -noout -subject -ext basicConstraints

step "Field: status"
show tpmid status

step "Field: renew now (new TPM key, simplereenroll with the LDevID), then the Edge CA"
before=$(openssl x509 -in "$work/store/certs/ldevid/current/cert.pem" -noout -pubkey | sha256sum | cut -c1-16)
show tpmid renew ldevid --force --chain
after=$(openssl x509 -in "$work/store/certs/ldevid/current/cert.pem" -noout -pubkey | sha256sum | cut -c1-16)
echo "LDevID public key: $before... -> $after... (rotated inside the TPM)"

step "Field: the renewal daemon plans the next renewals and stops cleanly on SIGTERM"
tpmid daemon 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do grep -q 'edge-ca: next renewal' "$work/daemon.log" 2>/dev/null && break; sleep 0.1; done
kill -TERM "$daemon_pid"; wait "$daemon_pid"
sed 's/^[0-9-]* [0-9:,]* //' "$work/daemon.log"

step "Field: check, in the spirit of iotedge check"
show tpmid check

step "The reference walkthrough's own curl | openssl commands against the same server"
export CA="$work/est/tls-ca.pem" EST="$base/.well-known/est" SECRET_FILE="$work/idevid.secret"
cd "$work"
walk() { printf '\033[2m$ %s\033[0m\n' "$1"; bash -euo pipefail -c "$1"; }
walk 'curl -s --cacert $CA $EST/idevid/cacerts | openssl base64 -d | openssl pkcs7 -inform DER -outform PEM -print_certs | openssl x509 -out globalsign-root.cert.pem'
walk 'openssl req -nodes -new -subj /CN=IDevID -sha256 -keyout IDevID.key.pem -out IDevID.csr 2>/dev/null'
walk 'curl -s -X POST --data-binary "@IDevID.csr" -H "Content-Transfer-Encoding:base64" -H "Secret-Value: $(cat $SECRET_FILE)" -H "Content-Type:application/pkcs10" --cacert $CA $EST/idevid/simpleenroll | openssl base64 -d | openssl pkcs7 -inform DER -outform PEM -print_certs | openssl x509 -out IDevID.cert.pem'
walk 'openssl verify -CAfile globalsign-root.cert.pem IDevID.cert.pem'
cd "$root"

step "Done: every private key above except the walkthrough's software key stayed inside the TPM"
