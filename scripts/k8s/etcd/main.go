// Command etcd is the etcd server of a pinned release, built from the Go module proxy for the
// test API server (scripts/fetch_k8s.sh); the same entry point as etcd's own main package.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
