/*
 * Input to bindgen (see ../regenerate.sh): the Xen 4.17 public headers that
 * xenkvm implements, as shipped by Debian's libxen-dev in /usr/include/xen.
 *
 * regenerate.sh passes -D__XEN_TOOLS__ for the 64-bit bindings only (see there).
 * The interface version is the latest one these headers know (4.17 = 0x00040e00).
 */
#define __XEN_INTERFACE_VERSION__ 0x00040e00

#include <stdint.h>

#include <xen/xen.h>
#include <xen/vcpu.h>
#include <xen/event_channel.h>
#include <xen/grant_table.h>
#include <xen/memory.h>
#include <xen/sched.h>
#include <xen/version.h>
#include <xen/features.h>
#include <xen/callback.h>
#include <xen/hvm/hvm_op.h>
#include <xen/hvm/params.h>
#include <xen/arch-x86/hvm/start_info.h>
#include <xen/arch-x86/cpuid.h>
#include <xen/hvm/save.h>
#include <xen/io/console.h>
#include <xen/io/xs_wire.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/elfnote.h>
#include <xen/errno.h>
