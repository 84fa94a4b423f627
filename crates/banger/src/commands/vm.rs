//! `banger vm …`: create, ls, show, rm.

use banger_proto::{ByteSize, CreateVmRequest, Vm};
use hyper::Method;

use crate::cli::{CreateArgs, VmCommand};
use crate::client::{Client, ClientError};
use crate::commands::print_json;
use crate::output;

pub async fn run(client: &Client, command: VmCommand) -> Result<u8, ClientError> {
    match command {
        VmCommand::Create(args) => create(client, args).await,
        VmCommand::Ls(flag) => {
            let vms: Vec<Vm> = client.call(Method::GET, "/v1/vms", None::<&()>).await?;
            if flag.json {
                print_json(&vms)?;
            } else {
                print!("{}", output::vm_table(&vms));
            }
            Ok(0)
        }
        VmCommand::Show { name, json } => {
            let vm: Vm = client
                .call(Method::GET, &format!("/v1/vms/{name}"), None::<&()>)
                .await?;
            if json.json {
                print_json(&vm)?;
            } else {
                print!("{}", output::vm_details(&vm));
            }
            Ok(0)
        }
        VmCommand::Rm { names } => {
            for name in names {
                client
                    .call::<()>(Method::DELETE, &format!("/v1/vms/{name}"), None::<&()>)
                    .await?;
                println!("Removed VM {name}");
            }
            Ok(0)
        }
    }
}

async fn create(client: &Client, args: CreateArgs) -> Result<u8, ClientError> {
    let request = CreateVmRequest {
        name: args.name.to_string(),
        image: args.image,
        cpus: args.cpus,
        memory_mib: args.memory.map(ByteSize::mib),
        disk_size_bytes: args.disk.map(|d| d.0),
    };
    let vm: Vm = client.call(Method::POST, "/v1/vms", Some(&request)).await?;
    if args.json.json {
        print_json(&vm)?;
    } else {
        println!(
            "Created VM {} ({} vCPUs, {} memory, {} disk, image {})",
            vm.name,
            vm.spec.cpus,
            ByteSize(vm.spec.memory_mib << 20),
            ByteSize(vm.spec.disk_size_bytes),
            vm.spec.image
        );
    }
    Ok(0)
}
