-- How a server runs, so a backup knows where its disks' consistent view
-- comes from: 'offline' reads the image files or block devices from the
-- host (refused while a running QEMU holds an image); 'qemu' takes a point
-- in time through the QMP socket `qmp_socket`; 'libvirt' through libvirtd's
-- domain `libvirt_domain`. Existing servers keep today's path.
ALTER TABLE servers ADD COLUMN runtime TEXT NOT NULL DEFAULT 'offline'
    CHECK (runtime IN ('offline', 'qemu', 'libvirt'));
ALTER TABLE servers ADD COLUMN qmp_socket TEXT;
ALTER TABLE servers ADD COLUMN libvirt_domain TEXT;
