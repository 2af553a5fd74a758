//go:build tools

// Package tools pins the KWOK command built by scripts/k8s-testenv/build.
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
