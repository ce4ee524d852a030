// Command vcsim serves govmomi's vSphere API simulator (govmomi 0.24.2, as packaged
// by Debian) for the platform lab. lab/vcsim/build.sh builds it.
//
// Unlike upstream's vcsim, the inventory is shaped before serving: objects can be
// named (-dc-name, -cluster-name, -ds-name, -pg-names) and VMs are created only
// after that, so their files live on the renamed datastore.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/simulator/esx"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

type options struct {
	listen                 string
	dc, cluster, host      int
	standalone, vm, ds, pg int
	dcName, clusterName    string
	dsName                 string
	pgNames                []string
	autostart, tls, trace  bool
	tlsCert, tlsKey        string
	username, password     string
	delay                  int
	delayJitter            float64
	methodDelay            map[string]int
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim:", err)
		os.Exit(1)
	}
}

func parseFlags() (*options, error) {
	o := new(options)
	var pgNames, methodDelay string

	flag.StringVar(&o.listen, "l", "127.0.0.1:8989", "listen address (port 0 picks a free port)")
	flag.IntVar(&o.dc, "dc", 1, "number of datacenters")
	flag.IntVar(&o.cluster, "cluster", 1, "clusters per datacenter")
	flag.IntVar(&o.host, "host", 3, "hosts per cluster")
	flag.IntVar(&o.standalone, "standalone-host", 0, "standalone hosts per datacenter")
	flag.IntVar(&o.vm, "vm", 0, "VMs per cluster and per standalone host")
	flag.IntVar(&o.ds, "ds", 1, "datastores per datacenter")
	flag.IntVar(&o.pg, "pg", 1, "distributed portgroups per datacenter")
	flag.StringVar(&o.dcName, "dc-name", "", "datacenter name (suffixed with its index when -dc > 1)")
	flag.StringVar(&o.clusterName, "cluster-name", "", "cluster name (suffixed with its index when -cluster > 1)")
	flag.StringVar(&o.dsName, "ds-name", "", "datastore name (suffixed with its index when -ds > 1)")
	flag.StringVar(&pgNames, "pg-names", "", "comma-separated portgroup names; sets -pg to their count")
	flag.BoolVar(&o.autostart, "autostart", true, "power on the VMs created by -vm")
	flag.StringVar(&o.username, "username", "user", "the only user accepted (empty: any non-empty user/password)")
	flag.StringVar(&o.password, "password", "", "its password (default: $VCSIM_PASSWORD, else pass); the variable keeps it out of the process list")
	flag.BoolVar(&o.tls, "tls", true, "serve HTTPS with the simulator's built-in self-signed certificate")
	flag.StringVar(&o.tlsCert, "tls-cert", "", "PEM certificate to serve (default: the simulator's built-in one)")
	flag.StringVar(&o.tlsKey, "tls-key", "", "PEM private key of -tls-cert")
	flag.IntVar(&o.delay, "delay", 0, "delay every SOAP call by this many milliseconds")
	flag.Float64Var(&o.delayJitter, "delay-jitter", 0, "delay jitter as a coefficient of variation (stddev/mean)")
	flag.StringVar(&methodDelay, "method-delay", "", "per-method delays, e.g. CloneVM_Task:200,PowerOnVM_Task:50")
	flag.BoolVar(&o.trace, "trace", false, "write SOAP requests and responses to stderr")
	flag.Parse()

	if flag.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", flag.Args())
	}
	for name, n := range map[string]int{"dc": o.dc, "cluster": o.cluster, "host": o.host,
		"standalone-host": o.standalone, "vm": o.vm, "ds": o.ds, "pg": o.pg, "delay": o.delay} {
		if n < 0 {
			return nil, fmt.Errorf("-%s must not be negative", name)
		}
	}
	if pgNames != "" {
		o.pgNames = strings.Split(pgNames, ",")
		for _, n := range o.pgNames {
			if strings.TrimSpace(n) != n || n == "" {
				return nil, fmt.Errorf("-pg-names: empty or padded name in %q", pgNames)
			}
		}
		o.pg = len(o.pgNames)
	}
	if o.vm > 0 && o.ds == 0 {
		return nil, errors.New("-vm needs a datastore (-ds >= 1)")
	}
	var err error
	if o.methodDelay, err = parseMethodDelay(methodDelay); err != nil {
		return nil, err
	}
	return o, nil
}

// parseMethodDelay reads "Method:ms,Method2:ms". Method is the SOAP method name as
// sent on the wire (CloneVM_Task, not CloneVMTask): the simulator keys delays by it.
func parseMethodDelay(s string) (map[string]int, error) {
	if s == "" {
		return nil, nil
	}
	delays := make(map[string]int)
	for _, item := range strings.Split(s, ",") {
		method, ms, ok := strings.Cut(item, ":")
		n, err := strconv.Atoi(ms)
		if !ok || method == "" || err != nil || n < 0 {
			return nil, fmt.Errorf("-method-delay: want Method:milliseconds, got %q", item)
		}
		delays[method] = n
	}
	return delays, nil
}

func run() error {
	o, err := parseFlags()
	if err != nil {
		return err
	}

	m := simulator.VPX()
	m.Datacenter = o.dc
	m.Cluster = o.cluster
	m.ClusterHost = o.host
	m.Host = o.standalone
	m.Datastore = o.ds
	m.Portgroup = o.pg
	m.Machine = 0 // created by shapeInventory, once the datastore has its final name
	if err := m.Create(); err != nil {
		return fmt.Errorf("create inventory: %w", err)
	}
	defer m.Remove() // the datastores' temporary directories

	ctx := context.Background()
	c, err := vim25.NewClient(ctx, m.Service) // in process, no HTTP
	if err != nil {
		return err
	}
	if err := shapeInventory(ctx, c, o); err != nil {
		return err
	}

	// Create() pointed the service at m.DelayConfig: set it only now so the setup above is not delayed.
	m.DelayConfig = simulator.DelayConfig{Delay: o.delay, DelayJitter: o.delayJitter, MethodDelay: o.methodDelay}
	simulator.Trace = o.trace

	// SessionManager.Login accepts any non-empty credentials when Listen.User is nil
	// (the simulator then advertises DefaultLogin user:pass); otherwise only this pair.
	m.Service.Listen = &url.URL{Host: o.listen}
	if o.password == "" {
		o.password = os.Getenv("VCSIM_PASSWORD")
	}
	if o.password == "" {
		o.password = "pass"
	}
	if o.username != "" {
		m.Service.Listen.User = url.UserPassword(o.username, o.password)
	}
	if o.tls {
		m.Service.TLS = new(tls.Config) // empty: NewServer uses its built-in self-signed certificate
		if o.tlsCert != "" {
			// A certificate from the lab's own CA lets clients verify TLS as against vCenter.
			pair, err := tls.LoadX509KeyPair(o.tlsCert, o.tlsKey)
			if err != nil {
				return fmt.Errorf("loading -tls-cert/-tls-key: %w", err)
			}
			m.Service.TLS.Certificates = []tls.Certificate{pair}
		}
	}
	srv, err := serve(m.Service)
	if err != nil {
		return err
	}
	defer srv.Close()

	// The URL carries the login; print it without the password (it ends up in logs).
	shown := *srv.URL
	if shown.User != nil {
		shown.User = url.User(shown.User.Username())
	}
	fmt.Printf("VCSIM_URL=%s\n", shown.String())

	sig, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	<-sig.Done()
	return nil
}

// serve turns NewServer's panic (e.g. address already in use) into an error.
func serve(s *simulator.Service) (srv *simulator.Server, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("serve: %v", r)
		}
	}()
	return s.NewServer(), nil
}

// nth names the i-th of n objects: the flag value itself when there is only one.
func nth(name string, i, n int) string {
	if n == 1 {
		return name
	}
	return fmt.Sprintf("%s%d", name, i)
}

// children returns the entities of the given type in folder, in creation order.
// A datastore folder lists a local datastore once per host mounting it: keep the first.
func children(folder types.ManagedObjectReference, kind string) []mo.Entity {
	var out []mo.Entity
	seen := make(map[types.ManagedObjectReference]bool)
	for _, ref := range simulator.Map.Get(folder).(*simulator.Folder).ChildEntity {
		if ref.Type == kind && !seen[ref] {
			seen[ref] = true
			out = append(out, simulator.Map.Get(ref).(mo.Entity))
		}
	}
	return out
}

// shapeInventory renames what the Model created and adds the VMs. It runs before the
// server starts, so plain field writes are safe and no property collector can miss them.
func shapeInventory(ctx context.Context, c *vim25.Client, o *options) error {
	dcs := children(c.ServiceContent.RootFolder, "Datacenter")
	for i, e := range dcs {
		dc := e.(*simulator.Datacenter)
		if o.dcName != "" {
			setName(dc, nth(o.dcName, i, len(dcs)))
		}

		clusters := children(dc.HostFolder, "ClusterComputeResource")
		for j, cl := range clusters {
			if o.clusterName != "" {
				setName(cl, nth(o.clusterName, j, len(clusters)))
			}
		}

		datastores := children(dc.DatastoreFolder, "Datastore")
		for j, ds := range datastores {
			if o.dsName != "" {
				setName(ds, nth(o.dsName, j, len(datastores)))
			}
		}

		// The Model names its portgroups <dc>_DVPG<n>; skip the DVS uplink portgroup.
		var portgroups []*simulator.DistributedVirtualPortgroup
		for _, pg := range children(dc.NetworkFolder, "DistributedVirtualPortgroup") {
			if strings.Contains(pg.Entity().Name, "_DVPG") {
				portgroups = append(portgroups, pg.(*simulator.DistributedVirtualPortgroup))
			}
		}
		if len(o.pgNames) > 0 {
			if len(portgroups) != len(o.pgNames) {
				return fmt.Errorf("found %d portgroups to name, want %d", len(portgroups), len(o.pgNames))
			}
			for j, pg := range portgroups {
				setName(pg, o.pgNames[j])
			}
		}

		if o.vm == 0 {
			continue
		}
		computes := append(append([]mo.Entity{}, clusters...), children(dc.HostFolder, "ComputeResource")...)
		ds := datastores[0].(*simulator.Datastore)
		var pg *simulator.DistributedVirtualPortgroup
		if len(portgroups) > 0 {
			pg = portgroups[0]
		}
		if err := addVMs(ctx, c, dc, computes, ds, pg, o); err != nil {
			return fmt.Errorf("create VMs: %w", err)
		}
	}
	return nil
}

// setName renames an entity, including the copies of its name that some types keep.
// Datastores and portgroups cannot be renamed through the 0.24.2 simulator's API.
func setName(e mo.Entity, name string) {
	e.Entity().Name = name
	switch x := e.(type) {
	case *simulator.Datastore:
		x.Summary.Name = name
		x.Info.GetDatastoreInfo().Name = name
	case *simulator.DistributedVirtualPortgroup:
		old := x.Name
		x.Name = name // Network.Name, which shadows ManagedEntity.Name
		x.Config.Name = name
		dvs := simulator.Map.Get(*x.Config.DistributedVirtualSwitch).(*simulator.DistributedVirtualSwitch)
		for i, n := range dvs.Summary.PortgroupName {
			if n == old {
				dvs.Summary.PortgroupName[i] = name
			}
		}
	}
}

// addVMs mirrors the Model's VMs (pvscsi + 1 MB disk, IDE cdrom, one NIC on the first
// portgroup or "VM Network"), named <compute resource>_VM<n>.
func addVMs(ctx context.Context, c *vim25.Client, dc *simulator.Datacenter, computes []mo.Entity,
	ds *simulator.Datastore, pg *simulator.DistributedVirtualPortgroup, o *options) error {
	nic := esx.EthernetCard
	if pg != nil {
		backing, err := object.NewDistributedVirtualPortgroup(c, pg.Self).EthernetCardBackingInfo(ctx)
		if err != nil {
			return err
		}
		nic.Backing = backing
	}
	folder := object.NewFolder(c, dc.VmFolder)

	for _, e := range computes {
		cr := object.NewComputeResource(c, e.Reference())
		pool, err := cr.ResourcePool(ctx)
		if err != nil {
			return err
		}
		var host *object.HostSystem // a cluster picks one itself
		if e.Reference().Type == "ComputeResource" {
			hosts, err := cr.Hosts(ctx)
			if err != nil || len(hosts) == 0 {
				return fmt.Errorf("standalone host of %s: %v", e.Entity().Name, err)
			}
			host = hosts[0]
		}

		for i := 0; i < o.vm; i++ {
			name := fmt.Sprintf("%s_VM%d", e.Entity().Name, i)
			var devices object.VirtualDeviceList
			scsi, _ := devices.CreateSCSIController("pvscsi")
			ide, _ := devices.CreateIDEController()
			cdrom, _ := devices.CreateCdrom(ide.(*types.VirtualIDEController))
			disk := devices.CreateDisk(scsi.(types.BaseVirtualController), ds.Self,
				fmt.Sprintf("[%s] %s/disk1.vmdk", ds.Name, name))
			disk.CapacityInKB = 1024
			vmNIC := nic
			devices = append(devices, scsi, cdrom, disk, &vmNIC)

			spec := types.VirtualMachineConfigSpec{
				Name:    name,
				GuestId: string(types.VirtualMachineGuestOsIdentifierOtherGuest),
				Files:   &types.VirtualMachineFileInfo{VmPathName: fmt.Sprintf("[%s]", ds.Name)},
			}
			if spec.DeviceChange, err = devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd); err != nil {
				return err
			}

			task, err := folder.CreateVM(ctx, spec, pool, host)
			if err != nil {
				return err
			}
			info, err := task.WaitForResult(ctx, nil)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			if o.autostart {
				vm := object.NewVirtualMachine(c, info.Result.(types.ManagedObjectReference))
				if task, err = vm.PowerOn(ctx); err == nil {
					err = task.Wait(ctx)
				}
				if err != nil {
					return fmt.Errorf("power on %s: %w", name, err)
				}
			}
		}
	}
	return nil
}
