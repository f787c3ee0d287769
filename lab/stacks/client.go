// A minimal Go net/http client for the lab: one GET, the status on stdout.
//
//	client [-connect IP] [-timeout 10s] URL
//
// TLS uses crypto/tls's defaults except that the certificate is not checked
// (the lab's CA is not in any system store), so the ClientHello is the one
// every Go program using net/http sends. -connect sends the connection to IP
// whatever the URL's host resolves to, so the URL keeps the real server name
// and with it the SNI. Only the standard library: `go build client.go` works
// offline, without a go.mod.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	connect := flag.String("connect", "", "connect to this IP instead of resolving the URL's host")
	timeout := flag.Duration("timeout", 10*time.Second, "limit for the whole request")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: client [-connect IP] [-timeout 10s] URL")
		os.Exit(2)
	}

	// A clone keeps the default transport's settings, HTTP/2 in ALPN included
	// (ForceAttemptHTTP2), which a bare Transport with a TLS config would lose.
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSClientConfig = &tls.Config{InsecureSkipVerify: true}
	if *connect != "" {
		dialer := &net.Dialer{}
		transport.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			_, port, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			return dialer.DialContext(ctx, network, net.JoinHostPort(*connect, port))
		}
	}

	client := &http.Client{Transport: transport, Timeout: *timeout}
	resp, err := client.Get(flag.Arg(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("%d\n%s", resp.StatusCode, body)
	if resp.StatusCode != http.StatusOK {
		os.Exit(1)
	}
}
